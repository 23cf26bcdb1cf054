"""What a run prints: a summary line and little else before training, progress in optimizer
updates with the true total (continued on resume), and no library noise."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, compose_config, run_training

from genlab.loop.steps import validation_interval
from genlab.console import result_summary

QUIET = ["trainer.max_steps=200", "loop.updates_per_step=50", "num_samples=2", "callbacks.insight=null", "threads=1"]


def test_the_console_shows_a_summary_progress_in_updates_and_no_library_noise(names_file, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "train.py", f"data.path={names_file}", *QUIET, f"hydra.run.dir={run_dir}",
                           f"paths.data_dir={tmp_path / 'data'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    first_update = next(i for i, line in enumerate(lines) if re.search(r"\] update \d", line))
    assert first_update <= 5, lines[:first_update]
    summary = re.compile(rf"mlp on names: [\d.]+K parameters, 1x cpu \(32-true\), 200 updates -> {re.escape(str(run_dir))}$")
    assert any(summary.search(line) for line in lines[:first_update]), lines[:first_update]
    progress = [line for line in lines if "] update " in line]
    assert all("/200 (" in line for line in progress) and "update 200/200 (100%)" in progress[-1]
    assert "val_loss" not in done.stdout and f"{run_dir}/metrics.json" in lines[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"val {metrics['val_loss']:.4f}, {metrics['val_bpc']:.3f} bits/char" in lines[-1]
    everything = done.stdout + done.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "FLOPs", "Warning", "it/s", "Epoch"):
        assert noise not in everything, noise
    assert "GPU available" in (run_dir / "train.log").read_text()  # Lightning's lines are kept in the log file


def test_an_image_runs_summary_names_its_fid_and_kid():
    metrics = {"loss_D": 1.1, "loss_G": 2.2, "fid": 84.123, "best_fid": 80.5, "kid_mean": 0.0712, "kid_std": 0.0031,
               "images_per_second": 50.0, "steps": 300, "train_seconds": 61.0}
    line = result_summary(metrics, "outputs/run", "update")
    assert "loss_D 1.1000, loss_G 2.2000, FID 84.12 (best 80.50), KID 0.0712 ± 0.0031 after 300 updates" in line


def test_progress_continues_from_the_resumed_update(names_file, tmp_path, caplog):
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", "loop.updates_per_step=20", "num_samples=0", "logger=none",
              "callbacks.insight=null", "trainer.enable_progress_bar=true", "val_every=20"]
    run_training(run_dir, [*common, "trainer.max_steps=100"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="genlab"):
        run_training(run_dir, [*common, "trainer.max_steps=200", f"ckpt_path={run_dir}"])
    done = [int(m.group(1)) for m in re.finditer(r"update (\d+)/200 ", caplog.text)]
    assert done and done[0] > 100 and done[-1] == 200 and done == sorted(done)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_counts_updates_to_the_true_total(names_file, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: __import__("os").terminal_size((120, 40)))
    run_training(tmp_path / "run", [f"data.path={names_file}", "loop.updates_per_step=50", "trainer.max_steps=200",
                                    "num_samples=0", "logger=none", "callbacks.insight=null",
                                    "trainer.enable_progress_bar=true"])
    shown = terminal.getvalue().replace("\r", "\n")
    assert "200/200" in shown and "update/s" in shown and "it/s" not in shown


@pytest.mark.parametrize("max_steps, updates_per_step, val_every, expected", [
    (2000, 1, None, 100), (20000, 200, None, 1000), (300, 200, None, 200), (5000, 1, 300, 300)])
def test_val_every_defaults_to_twenty_validations(tmp_path, max_steps, updates_per_step, val_every, expected):
    cfg = compose_config([f"trainer.max_steps={max_steps}", f"val_every={'null' if val_every is None else val_every}"],
                         tmp_path)
    assert validation_interval(cfg, updates_per_step) == expected


def test_torch_compiles_guess_of_a_cuda_home_is_not_shown_other_compiler_warnings_are(caplog):
    from genlab.console import route_library_logs

    route_library_logs()
    compiler_log = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING):
        compiler_log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        compiler_log.warning("the C++ compiler failed")
    assert "CUDA_HOME" not in caplog.text and "the C++ compiler failed" in caplog.text
