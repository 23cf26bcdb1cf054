"""A stop request saves first: whatever runs when SIGTERM, SIGINT or SIGUSR1 arrives, the
checkpoint of the last finished update is written and the run ends, without waiting for a
validation; the validation it abandoned is run again when the run resumes."""

from __future__ import annotations

import csv
import signal
import time

import lightning as L
import pytest
import torch
from conftest import compose_config, run_training

from genlab.cli.train import train

LONG = ["loop.updates_per_step=10", "trainer.max_steps=60", "val_every=20", "num_samples=3", "logger=csv",
        "data.eval_batch_size=1"]  # one name per validation batch: a validation of some 30 batches


class SlowValidation(L.Callback):
    """Every validation batch takes ``seconds`` more (a large validation split); counts them."""

    batches = 0

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_validation_batch_end(self, *args):
        SlowValidation.batches += 1
        time.sleep(self.seconds)


def validated_steps(run_dir) -> list[int]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("loss/val")})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_during_a_long_validation_saves_at_once_and_the_resume_runs_that_validation_again(
        signum, names_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *LONG]
    faults = ["+callbacks.slow._target_=test_stop.SlowValidation", "+callbacks.kill._target_=conftest.SendSignal",
              "+callbacks.kill.where=validation", f"+callbacks.kill.signum={int(signum)}"]
    SlowValidation.batches = 0
    with pytest.raises(SystemExit) as stopped:
        train(compose_config(common + faults, run_dir))
    assert stopped.value.code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} at step 20" in capsys.readouterr().err
    # saved before the validation went on: its first batch was the last, nothing it ends with was written
    assert SlowValidation.batches == 1
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    assert validated_steps(run_dir) == [] and not (run_dir / "samples.txt").exists()

    resumed = run_training(run_dir, [*common, f"ckpt_path={run_dir}"])
    assert validated_steps(run_dir) == [20, 40, 60]  # the abandoned one first
    straight = run_training(tmp_path / "straight", common)
    assert validated_steps(tmp_path / "straight") == [20, 40, 60]
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)
    assert resumed["best_val_loss"] == pytest.approx(straight["best_val_loss"], rel=1e-6)


class SlowTest(L.Callback):
    """Every batch of the final test evaluation takes ``seconds`` more (a large test split); counts them."""

    batches, ended = 0, 0.0

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def on_test_batch_end(self, *args):
        SlowTest.batches += 1
        time.sleep(self.seconds)
        SlowTest.ended = time.monotonic()  # the signal follows (conftest.SendSignal, the next callback)


def test_a_sigterm_during_the_final_evaluation_ends_the_run_at_once_and_the_resume_finishes_it(
        names_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *LONG]
    faults = ["+callbacks.slow._target_=test_stop.SlowTest", "+callbacks.kill._target_=conftest.SendSignal",
              "+callbacks.kill.where=test"]
    SlowTest.batches = 0
    with pytest.raises(SystemExit) as stopped:
        train(compose_config(common + faults, run_dir))
    with capsys.disabled():  # measured, not asserted (machines differ)
        print(f"\nSIGTERM in the final evaluation: exit {time.monotonic() - SlowTest.ended:.2f} s later")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 60" in capsys.readouterr().err
    # the evaluation stopped at the batch the signal came in (Lightning's SIGTERM handler of the test
    # stage would have run all 30-odd batches, then ended with status 0 and no metrics)
    assert SlowTest.batches == 1
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 60
    assert not (run_dir / "metrics.json").exists()

    resumed = run_training(run_dir, [*common, f"ckpt_path={run_dir}"])  # the wrap-up, done on resume
    assert resumed["status"] == "completed" and resumed["steps"] == 60 and "test_loss" in resumed
