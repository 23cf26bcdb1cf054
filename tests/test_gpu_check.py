"""make gpu-check, as far as a machine without a GPU can check it: the refusal and the report lines."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_training

sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import RUNS, SteadyClock, result_line, run_config  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_fails():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where there is one"]


def test_report_lines():
    gpt = {"tokens_per_second": 400_000.0, "val_loss": 1.2345}
    line = result_line("notebook_gpt", 400_000.0, gpt, flops_per_token=6e7, peak_flops=989e12, peak_memory=3 * 2**30)
    assert line == "notebook_gpt: 400,000 tokens/s, MFU 2.4%, val 1.234, peak GPU memory 3.0 GiB"
    dcgan = {"images_per_second": 5123.4, "loss_d": 0.5}
    assert result_line("notebook_dcgan", 5123.4, dcgan, None, None, 2**29) == \
        "notebook_dcgan: 5,123 images/s, peak GPU memory 0.5 GiB"


def test_steady_clock_times_the_last_two_thirds_of_a_run(tmp_path, names_file):
    """The clock the check reads, on the CPU: it starts a third of the way in and stops at the last
    update, so its rate covers two thirds of the tokens trained on."""
    metrics = run_training(tmp_path / "run", [
        "model=mlp", f"data.path={names_file}", "trainer.max_steps=60", "loop.updates_per_step=5",
        "val_every=30", "logger=none", f"+callbacks.steady_clock._target_={SteadyClock.__module__}.SteadyClock"])
    clock = SteadyClock.latest
    assert clock.start is not None and clock.rate is not None and clock.rate > 0
    assert metrics["steps"] == 60


def test_every_run_of_the_check_composes_and_passes_the_checks_on_a_gpu(fake_gpus, tmp_path):
    """What a GPU session would otherwise find out first: each run's overrides compose (a comma in a
    folder name would read as a Hydra sweep) and pass genlab's checks, on an H200 (faked)."""
    from genlab.run.checks import check_config
    from genlab.loop.precision import resolve_precision

    fake_gpus([("NVIDIA H200", (9, 0))])
    compiled = {}
    for name in RUNS:
        cfg = run_config(name, tmp_path)
        check_config(cfg)
        assert resolve_precision(cfg).startswith("bf16-mixed, as NVIDIA H200") and cfg.trainer.accelerator == "gpu"
        assert cfg.trainer.max_steps == 300  # the command line's count, not the preset's
        compiled[name] = cfg.loop.compile
    assert sorted(map(str, compiled.values())) == ["False", "False", "False", "True", "reduce-overhead"]
    assert len({run_config(name, tmp_path).paths.output_dir for name in RUNS}) == len(RUNS)
