"""SIGUSR1 under SLURM: a requeue only where it continues the run (a checkpoint exists, fewer than
``max_requeues`` so far), said as it is, and every attempt and task of a job in one run folder."""

from __future__ import annotations

import signal

import lightning as L
import pytest
from conftest import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from test_reliability import STOPPABLE, fake_slurm

from genlab.run.runtime import CONF_DIR
from genlab.cli.train import train

PREEMPT = ["+callbacks.kill._target_=conftest.SendSignal", "+callbacks.kill.where=train",
           f"+callbacks.kill.signum={int(signal.SIGUSR1)}", "+callbacks.kill.at=3"]


class SignalAtSetup(L.Callback):
    """Fault injection: SIGUSR1 while the run starts, before training (a long start-up)."""

    def setup(self, trainer, pl_module, stage):
        signal.raise_signal(signal.SIGUSR1)


def preempt(cfg, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 128 + signal.SIGUSR1
    return capsys.readouterr().err


def test_a_job_requeued_max_requeues_times_is_not_requeued_again(names_file, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    requeues = fake_slurm(monkeypatch, tmp_path, job="901", restart=2)
    err = preempt(compose_config([f"data.path={names_file}", *STOPPABLE, *PREEMPT, "max_requeues=3"], run_dir), capsys)
    assert f"requeued SLURM job 901 (3 of at most 3 requeues): its next attempt continues from step 30 in {run_dir}" in err
    assert requeues.read_text().split() == ["requeue", "901"]

    requeues.unlink()
    fake_slurm(monkeypatch, tmp_path, job="901", restart=3)  # that attempt, pre-empted again
    err = preempt(compose_config([f"data.path={names_file}", *STOPPABLE, *PREEMPT, "max_requeues=3"], run_dir), capsys)
    assert "not requeued: SLURM job 901 has been requeued 3 times, max_requeues=3; submit it again to continue" in err
    assert not requeues.exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_no_requeue_before_the_first_checkpoint(names_file, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    requeues = fake_slurm(monkeypatch, tmp_path, job="902", restart=0)
    err = preempt(compose_config([f"data.path={names_file}", *STOPPABLE,
                                  "+callbacks.early._target_=test_requeue.SignalAtSetup"], run_dir), capsys)
    assert "stopped by SIGUSR1 before the first checkpoint" in err
    assert "not requeued: SLURM job 902 was stopped before its first checkpoint" in err
    assert not requeues.exists()  # a start-up longer than the signal's lead would loop for ever


def run_folder(monkeypatch, **slurm) -> str:
    """The folder a new run's command resolves, under these SLURM variables."""
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=mlp", "data=names"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return str(cfg.hydra.run.dir)


def test_every_task_and_every_attempt_of_a_slurm_job_names_one_run_folder(monkeypatch):
    attempts = {run_folder(monkeypatch, SLURM_JOB_ID="903", SLURM_STEP_ID="0", SLURM_PROCID=task,
                           SLURM_RESTART_COUNT=restart) for task in ("0", "1") for restart in ("0", "1")}
    assert attempts == {"outputs/runs/mlp-names/slurm/903.0"}
    assert run_folder(monkeypatch, SLURM_JOB_ID="903") == "outputs/runs/mlp-names/slurm/903"  # the batch script
    assert run_folder(monkeypatch, SLURM_JOB_ID="903", SLURM_STEP_ID="1") == "outputs/runs/mlp-names/slurm/903.1"
    elsewhere = run_folder(monkeypatch)
    assert elsewhere.startswith("outputs/runs/mlp-names/") and "slurm" not in elsewhere  # a timestamp
