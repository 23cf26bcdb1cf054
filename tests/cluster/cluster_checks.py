"""Sweeps against a real scheduler (``make test-cluster``; ``tests/cluster/run.sh`` starts the one-node
SLURM and the PostgreSQL server these need, and stops them). Not collected by ``make test``: it needs
root and those daemons.

- a 2-job ``hydra/launcher=slurm`` sweep of 2-process ``trainer=ddp_cpu`` runs, identical but for their
  names; one is pre-empted mid-run with ``scancel --signal=USR1``, requeued, resumed, and ends at the
  other's step count and loss;
- a job refused by its folder ends on both of its processes, and says why in the sweep's summary;
- two Optuna workers on one PostgreSQL study end with all their trials in it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, snapshot

SLURM = ["hydra/launcher=slurm", "trainer=ddp_cpu", "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.nodes=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=20"]
# long enough to be pre-empted after its first checkpoint (every 100 updates)
TRAINING = ["model=mlp", "data.batch_size=8", "trainer.max_steps=3000", "val_every=100", "model.updates_per_step=10",
            "num_samples=0", "trainer.enable_progress_bar=false", "callbacks.insight=null", "threads=1"]


def wait_for(condition, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(1)
    return found


def test_a_preempted_slurm_job_is_requeued_and_ends_where_the_job_left_alone_ends(names_file, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", *SLURM, *TRAINING, f"data.path={names_file}",
               f"paths.data_dir={tmp_path / 'data'}", "name=alone,preempted", f"hydra.sweep.dir={sweep}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_dir = sweep / "1-name=preempted"
    wait_for(lambda: (job_dir / "checkpoints" / "last.ckpt").exists(), "first checkpoint")
    job = json.loads((job_dir / ".hydra" / "slurm.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # to its processes, as SLURM's USR1@120 does
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-4000:]
    assert "sweep: all 2 jobs completed" in out
    assert "Bypassing sacct error" not in out and "accounting storage is disabled" not in out  # a quiet console

    record = json.loads((job_dir / ".hydra" / "slurm.json").read_text())
    assert record == {"job_id": job, "restart_count": 1}  # requeued once, and resumed in its own folder
    log = (job_dir / "train.log").read_text()
    assert "Restored all states from the checkpoint" in log
    assert not list(job_dir.glob("hpc_ckpt_*"))  # one checkpoint, genlab's, at a step boundary
    alone, preempted = (json.loads((sweep / name / "metrics.json").read_text())
                        for name in ("0-name=alone", "1-name=preempted"))
    assert alone["world_size"] == preempted["world_size"] == 2
    assert preempted["steps"] == alone["steps"] == 3000
    assert preempted["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
    assert preempted["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    print(f"pre-empted job {job}: val_loss {preempted['val_loss']:.6f}, left alone {alone['val_loss']:.6f}")

    # the same sweep over its folder with another setting: each job is refused, on both of its processes,
    # without writing into the folder of the run it found
    before = {name: snapshot(sweep / name) for name in ("0-name=alone", "1-name=preempted")}
    submitted = {p.name for p in (sweep / ".submitit").iterdir()}
    refused = subprocess.run([*command, "trainer.max_steps=200"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "sweep: 0 of 2 jobs completed" in refused.stderr and "0-name=alone refused: " in refused.stderr
    assert {name: snapshot(sweep / name) for name in before} == before
    logs = [p for p in (sweep / ".submitit").iterdir() if p.name not in submitted and re.fullmatch(r"\d+_\d+", p.name)]
    assert len(logs) == 2  # <array job>_<task>: one folder per job
    for job_logs in logs:
        for rank in (0, 1):  # each process ended with the first one's refusal
            text = "".join(p.read_text() for p in job_logs.glob(f"*_{rank}_log.*"))
            assert "this job refused: " in text and "holds a run of another configuration" in text, text[-2000:]


def test_two_optuna_workers_share_one_postgresql_study(names_file, tmp_path):
    import optuna

    storage = os.environ["GENLAB_OPTUNA_DB"]
    workers = [subprocess.Popen(
        [sys.executable, "train.py", "hparams_search=names_mlp_optuna", f"data.path={names_file}",
         "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=cluster",
         f"hydra.sweep.dir={tmp_path / f'worker{i}'}", "scheduler.milestones=[1000]", *TRAINING,
         "trainer.max_steps=200", f"paths.data_dir={tmp_path / 'data'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="cluster", storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
