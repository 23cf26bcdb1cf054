"""eval.py: a checkpoint's losses on its run's splits; the debug= group; sample.py's and eval.py's --help."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_eval, run_training

from genlab.errors import CheckpointError, ConfigError

SMALL = ["loop.updates_per_step=20", "trainer.max_steps=40", "val_every=20", "num_samples=0", "logger=none",
         "callbacks.insight=null"]


def evaluate(overrides: list[str], tmp_path):
    return run_eval([f"paths.data_dir={tmp_path / 'data'}", *overrides])


def test_eval_gives_the_losses_the_run_reported(names_file, tmp_path):
    run = tmp_path / "run"
    metrics = run_training(run, [f"data.path={names_file}", *SMALL])
    result = evaluate([f"ckpt_path={run}"], tmp_path)
    assert result["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert result["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert result["val_bpc"] == pytest.approx(metrics["val_bpc"], rel=1e-6)
    assert result["test_bpc"] == pytest.approx(metrics["test_bpc"], rel=1e-6)
    assert json.loads((run / "eval.json").read_text())["step"] == 40


def test_eval_refuses_what_it_cannot_measure(names_file, tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path is missing"):
        evaluate([], tmp_path)
    run = tmp_path / "run"
    run_training(run, [f"data.path={names_file}", *SMALL])
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(CheckpointError, match=r"\.hydra/config\.yaml is missing"):
        evaluate([f"ckpt_path={lone}"], tmp_path)


def test_debug_overfit_trains_on_one_batch(names_file, tmp_path):
    """Every update sees the same batch: the training loss falls far below what real training reaches."""
    metrics = run_training(tmp_path / "run", [f"data.path={names_file}", "debug=overfit", "model.n_hidden=64",
                                              "trainer.max_steps=600", "val_every=600", "num_samples=0", "logger=csv"])
    with open(tmp_path / "run" / "csv" / "metrics.csv", newline="") as f:
        train = [float(r["loss/train"]) for r in csv.DictReader(f) if r.get("loss/train")]
    assert train[-1] < 0.6 * train[0] and train[-1] < metrics["val_loss"] - 0.5


def test_debug_fast_writes_outside_the_runs_folder(names_file, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "train.py", "debug=fast", f"data.path={names_file}",
                           f"paths.data_dir={tmp_path / 'data'}", "logger=none"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [metrics] = (tmp_path / "genlab-debug").glob("mlp-names/*/metrics.json")
    assert json.loads(metrics.read_text())["steps"] == 20


@pytest.mark.parametrize("script, own, foreign", [("sample.py", "temperature", "optimizer"),
                                                  ("eval.py", "ckpt_path", "model:")])
def test_help_lists_only_the_commands_own_options(script, own, foreign):
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and own in done.stdout and f"python {script} ckpt_path=" in done.stdout
    assert foreign not in done.stdout and "Configuration groups" not in done.stdout


def test_debug_profile_writes_where_the_time_went(names_file, tmp_path):
    run = tmp_path / "run"
    run_training(run, [f"data.path={names_file}", "debug=profile", "trainer.max_steps=40", "loop.updates_per_step=20",
                       "num_samples=0", "logger=none", "callbacks.insight=null"])
    profile = (run / "fit-profile.txt").read_text()
    assert "run_training_batch" in profile
