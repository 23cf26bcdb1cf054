"""The precision chosen by the card (trainer=gpu, ddp: precision auto), on the CPU with the GPUs'
names and compute capabilities faked; trainer=mps refused where there is no Apple GPU, and what
does not run there refused where there is one (faked)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import compose_config, run_training
from lightning.pytorch.accelerators import MPSAccelerator
from omegaconf import OmegaConf

from genlab.run.checks import check_config
from genlab.console import run_summary
from genlab.errors import ConfigError
from genlab.loop.precision import resolve_precision
from genlab.cli.train import train


@pytest.mark.parametrize("card, capability, chosen", [
    ("NVIDIA H200", (9, 0), "bf16-mixed"), ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16-mixed"),
    ("NVIDIA GeForce RTX 2080", (7, 5), "16-mixed"), ("Tesla V100-SXM2-16GB", (7, 0), "16-mixed")])
def test_trainer_gpu_takes_bf16_where_the_card_runs_it_natively_else_fp16(card, capability, chosen, fake_gpus,
                                                                         tmp_path):
    fake_gpus([(card, capability)])
    cfg = compose_config(["trainer=gpu"], tmp_path / "run")
    assert cfg.trainer.precision == "auto"
    words = resolve_precision(cfg)
    assert cfg.trainer.precision == chosen  # the run's recorded config says what it trained with
    where = f"{card} at compute capability {capability[0]}.{capability[1]}"
    if chosen == "bf16-mixed":
        assert words == f"bf16-mixed, as {where} runs bfloat16 natively"
    else:
        assert words == f"16-mixed with loss scaling, as {where} has no native bfloat16 (8.0 and up)"


@pytest.mark.parametrize("trainer", ["ddp", "multinode"])
def test_ddp_takes_the_precision_of_the_least_capable_card(trainer, fake_gpus, tmp_path):
    fake_gpus([("NVIDIA A100-SXM4-80GB", (8, 0)), ("Tesla T4", (7, 5)), ("NVIDIA H100", (9, 0))])
    cfg = compose_config([f"trainer={trainer}"], tmp_path / "run")
    assert "Tesla T4" in resolve_precision(cfg) and cfg.trainer.precision == "16-mixed"


def test_trainer_precision_given_is_kept_and_bf16_on_an_old_card_is_called_slow(fake_gpus, tmp_path):
    fake_gpus([("Tesla T4", (7, 5))])
    cfg = compose_config(["trainer=gpu", "trainer.precision=32-true"], tmp_path / "run")
    assert resolve_precision(cfg) == "32-true from trainer.precision" and cfg.trainer.precision == "32-true"
    cfg = compose_config(["trainer=gpu", "trainer.precision=bf16-mixed"], tmp_path / "run")
    assert resolve_precision(cfg) == ("bf16-mixed from trainer.precision; Tesla T4 at compute capability 7.5 "
                                      "emulates bfloat16: slow")
    assert cfg.trainer.precision == "bf16-mixed"
    fake_gpus([("NVIDIA H100 80GB HBM3", (9, 0))])
    cfg = compose_config(["trainer=gpu", "trainer.precision=16-mixed"], tmp_path / "run")
    assert resolve_precision(cfg) == "16-mixed from trainer.precision" and cfg.trainer.precision == "16-mixed"


def test_the_run_summary_names_the_precision_and_why(fake_gpus, tmp_path):
    fake_gpus([("Tesla T4", (7, 5))])
    cfg = compose_config(["trainer=gpu"], tmp_path / "run")
    words = resolve_precision(cfg)
    model = torch.nn.Linear(10, 10)  # 110 parameters
    trainer = types.SimpleNamespace(num_devices=1, precision=cfg.trainer.precision, max_steps=5000)
    line = run_summary({"model": "gpt", "data": "divina", "trainer": "gpu"}, model, trainer, "outputs/x", words)
    assert line == ("gpt on divina: 110 parameters, 1x gpu (16-mixed with loss scaling, as Tesla T4 at compute "
                    "capability 7.5 has no native bfloat16 (8.0 and up)), 5,000 updates -> outputs/x")


def test_auto_on_the_cpu_is_float32_and_the_run_records_it(names_file, tmp_path):
    run_dir = tmp_path / "run"
    metrics = run_training(run_dir, [f"data.path={names_file}", "trainer.precision=auto", "loop.updates_per_step=5",
                                     "trainer.max_steps=10", "val_every=10", "num_samples=0", "logger=none"])
    assert metrics["status"] == "completed"
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.precision == "32-true"


def test_trainer_mps_without_an_apple_gpu_is_refused_in_one_line(names_file, tmp_path):
    if MPSAccelerator.is_available():
        pytest.skip("this machine has an Apple GPU: the refusal is for machines without one")
    cfg = compose_config([f"data.path={names_file}", "trainer=mps"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^trainer=mps needs the GPU of an Apple-silicon Mac .*; use trainer=cpu$"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_trainer_gpu_on_a_mac_points_to_trainer_mps(names_file, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: True))
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU.*; use trainer=cpu or trainer=mps \(this Mac's GPU\)$"):
        check_config(compose_config([f"data.path={names_file}", "trainer=gpu"], tmp_path / "run"))


@pytest.mark.parametrize("override, refusal", [
    ("loop.compile=true", "loop.compile=True does not run on trainer=mps.*set loop.compile=false"),
    ("loop.compile=reduce-overhead", "loop.compile=reduce-overhead does not run on trainer=mps"),
    ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed does not run on trainer=mps.*32-true or 16-mixed"),
    ("+trainer.strategy=ddp", "trainer=mps trains on one device"),
    ("trainer.devices=2", "trainer=mps trains on one device")])
def test_what_does_not_run_on_mps_is_refused_with_the_reason(override, refusal, names_file, monkeypatch, tmp_path):
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: True))
    check_config(compose_config([f"data.path={names_file}", "trainer=mps"], tmp_path / "run"))  # the plain run passes
    cfg = compose_config([f"data.path={names_file}", "trainer=mps", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=refusal):
        check_config(cfg)
