"""Resume exactly, stop cleanly on a signal wherever it lands, refuse bad checkpoints, repeat runs
exactly, and never mix two runs in one folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config, run_training, snapshot
from genlab.errors import CheckpointError, ConfigError
from genlab.run.plan import resolve as resolve_plan
from genlab.run.runs import RunFolder
from genlab.cli.train import train

MODELS = {
    "mlp": ["model=mlp", "model.n_hidden=32", "loop.updates_per_step=10"],
    "lstm": ["model=lstm", "model.n_hidden=32", "model.dropout=0.2", "loop.updates_per_step=10", "data=divina", "data.sampling=sequential",
             "data.seq_len=16", "data.batch_size=4"],
    "gpt": ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.2",
            "data=divina", "data.seq_len=16", "data.batch_size=4"],
}


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", MODELS)
def test_resume_continues_exactly(name, names_file, text_file, tmp_path):
    data = [f"data.path={text_file if 'data=divina' in MODELS[name] else names_file}"]
    common = MODELS[name] + data + ["scheduler=step", "scheduler.milestones=[150]", "val_every=50",
                                    "num_samples=0", "logger=csv"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(straight, common + ["trainer.max_steps=200"])
    run_training(resumed, common + ["trainer.max_steps=100"])
    metrics = run_training(resumed, common + ["trainer.max_steps=200", f"ckpt_path={resumed}"])
    assert metrics["steps"] == 200
    a, b = weights(straight), weights(resumed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), f"{key} differs after resuming"


def test_a_checkpoint_of_another_model_is_refused(names_file, tmp_path):
    run_dir = tmp_path / "mlp"
    run_training(run_dir, [f"data.path={names_file}", "loop.updates_per_step=10", "trainer.max_steps=20",
                           "val_every=20", "num_samples=0", "logger=none"])
    cfg = compose_config([f"data.path={names_file}", "model=gpt", f"ckpt_path={run_dir}"], tmp_path / "gpt")
    with pytest.raises(CheckpointError, match="holds a MLP model.*is a GPT"):
        train(cfg)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", None])
def test_unreadable_checkpoints_are_refused(content, names_file, tmp_path):
    bad = tmp_path / "bad.ckpt"
    if content is None:  # a real checkpoint cut short, as by a killed copy
        run_training(tmp_path / "run", [f"data.path={names_file}", "loop.updates_per_step=10",
                                        "trainer.max_steps=20", "val_every=20", "num_samples=0", "logger=none"])
        content = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()[:2000]
    bad.write_bytes(content)
    cfg = compose_config([f"data.path={names_file}", f"ckpt_path={bad}"], tmp_path / "new")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(cfg)
    assert not (tmp_path / "new" / "metrics.json").exists()


def test_same_seed_same_metrics_and_seed_zero_is_valid(names_file, tmp_path):
    common = [f"data.path={names_file}", "loop.updates_per_step=10", "trainer.max_steps=60", "val_every=30",
              "num_samples=0", "logger=none", "seed=0", "data.seed=0"]
    first = run_training(tmp_path / "a", common)
    second = run_training(tmp_path / "b", common)
    for key in ("val_loss", "best_val_loss", "test_loss", "steps"):
        assert first[key] == second[key]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_prints_the_resume_command_and_resumes(signum, names_file, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", f"data.path={names_file}", "loop.updates_per_step=10",
            "trainer.max_steps=100000000", "val_every=100000", "num_samples=0", f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run_dir.glob("tensorboard/events*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # some training
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err[-2000:]
    assert f"stopped by {name} at step" in err and f"ckpt_path={run_dir}" in err
    assert not (run_dir / "metrics.json").exists()  # an interrupted run has no final metrics
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] > 0
    command = err.split("Resume with:")[1].strip().split()
    resume = [sys.executable, *command[1:]]
    resume = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={saved['global_step'] + 20}"
              for a in resume]
    done = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == saved["global_step"] + 20


# --- a signal wherever it lands -------------------------------------------------------------------
STOPPABLE = ["loop.updates_per_step=10", "trainer.max_steps=60", "val_every=20", "num_samples=3", "logger=csv"]


@pytest.mark.parametrize("where, saved_step", [("train", 10), ("validation", 20), ("test", 60)])
def test_sigterm_in_training_validation_or_test_saves_exits_143_and_the_run_resumes(where, saved_step, names_file,
                                                                                    tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *STOPPABLE]
    cfg = compose_config(common + ["+callbacks.kill._target_=conftest.SendSignal", f"+callbacks.kill.where={where}"],
                         run_dir)
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM at step {saved_step}; saved {run_dir / 'checkpoints' / 'last.ckpt'}" in err
    assert f"ckpt_path={run_dir}" in err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved_step
    assert not (run_dir / "metrics.json").exists()  # an interrupted run has no final figures
    metrics = run_training(run_dir, common + [f"ckpt_path={run_dir}"])  # the resume (same max_steps)
    assert metrics["status"] == "completed" and metrics["steps"] == 60 and metrics["test_loss"] > 0
    assert len((run_dir / "samples.txt").read_text().splitlines()) == 3


def test_the_resume_command_printed_after_a_late_sigterm_finishes_the_run(names_file, tmp_path):
    """SIGTERM during the final test: the printed command completes the run (it once ended in KeyError)."""
    run_dir = tmp_path / "run"
    kill = ["+callbacks.kill._target_=conftest.SendSignal", "+callbacks.kill.where=test"]
    args = [f"data.path={names_file}", *STOPPABLE, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    stopped = subprocess.run([sys.executable, "train.py", *args, *kill], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=env)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    command = stopped.stderr.split("Resume with:")[1].split()
    resume = [a for a in command[2:] if not a.startswith("+callbacks.kill")]  # the test's fault injection only
    done = subprocess.run([sys.executable, "train.py", *resume], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


# --- one run per folder ---------------------------------------------------------------------------
SMALL = ["loop.updates_per_step=10", "model.n_hidden=32", "trainer.max_steps=20", "val_every=20", "num_samples=0",
         "logger=csv"]


def test_a_second_run_in_a_folder_holding_a_run_is_refused_unless_it_overwrites(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    before = snapshot(run_dir)
    again = compose_config([f"data.path={names_file}", *SMALL, "optimizer.lr=0.05"], run_dir)
    with pytest.raises(ConfigError, match=f"{run_dir} already holds a run.*ckpt_path={run_dir}.*overwrite=true"):
        train(again)
    assert snapshot(run_dir) == before  # nothing written, nothing mixed

    (run_dir / "notes.txt").write_text("mine")  # something of the user's beside the run
    run_training(run_dir, [f"data.path={names_file}", *SMALL, "optimizer.lr=0.05", "overwrite=true"])
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["optimizer"]["lr"] == 0.05
    assert "lr: 0.05" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not list((run_dir / "checkpoints").glob("*-v1.ckpt"))


def test_two_processes_never_write_one_folder(names_file, tmp_path):
    run_dir = tmp_path / "run"
    with RunFolder(run_dir) as other:  # another run holds the folder
        other.open(resolve_plan(compose_config([f"data.path={names_file}", *SMALL], run_dir)))
        cfg = compose_config([f"data.path={names_file}", *SMALL, "overwrite=true"], run_dir)
        with pytest.raises(ConfigError, match=f"another process \\(pid {os.getpid()}\\) is writing {run_dir}"):
            train(cfg)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # the holder's lock, nothing of the refused run
    assert not run_dir.exists()  # the holder wrote nothing either: its empty folder went with its lock


@pytest.mark.parametrize("overrides, error", [
    (["model=gpt", "model.n_embd=16", "model.n_head=2", "model.n_layer=1"], "holds a MLP model, but model=.* is a GPT"),
    (["model.n_hidden=48"], "model.n_hidden=32 in the checkpoint but 48 now"),
    (["model.n_embd=12"], "model.n_embd=10 in the checkpoint but 12 now"),
    ([], "has finished: it trained 20 updates, and trainer.max_steps=20 asks for no more.*trainer.max_steps=40"),
    (["trainer.max_steps=10"], "has finished: it trained 20 updates"),
])
def test_a_refused_resume_changes_nothing_on_disk(overrides, error, names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    before = snapshot(run_dir)
    small = [o for o in SMALL if not (overrides and o.startswith("model.n_hidden") and "model=gpt" in overrides)]
    cfg = compose_config([f"data.path={names_file}", *small, *overrides, f"ckpt_path={run_dir}"], run_dir)
    with pytest.raises(CheckpointError, match=error):
        train(cfg)
    assert snapshot(run_dir) == before  # the finished run's record (.hydra, metrics.json) is as it was


def test_a_resume_that_fails_leaves_no_metrics_of_the_old_run(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    cfg = compose_config([f"data.path={names_file}", *SMALL, "trainer.max_steps=40", f"ckpt_path={run_dir}",
                          "+callbacks.fail._target_=conftest.FailAt"], run_dir)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    assert not (run_dir / "metrics.json").exists()  # not "completed" at 20 updates for a run that went on


def test_files_a_run_writes_are_readable_by_others(names_file, tmp_path):
    previous = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        run_training(run_dir, [f"data.path={names_file}", *SMALL, "num_samples=2"])
    finally:
        os.umask(previous)
    for path in (run_dir / "metrics.json", run_dir / "samples.txt", run_dir / ".hydra" / "config.yaml"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_refused_resume_on_the_command_line_leaves_the_runs_record_as_it_was(names_file, tmp_path):
    """Hydra once rewrote .hydra/*.yaml of the finished run before the resume was refused, so
    compare.py then reported the refused command's parameters for that run."""
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *SMALL, "trainer.enable_progress_bar=false"]
    first = subprocess.run([sys.executable, "train.py", *common, f"hydra.run.dir={run_dir}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    log = (run_dir / "train.log").read_text().splitlines()  # what was logged before the claim too, once
    assert any("names: 300 entries" in line for line in log) and len(log) == len(set(log))
    before = snapshot(run_dir)
    refused = subprocess.run([sys.executable, "train.py", *common, "model.n_hidden=64", f"ckpt_path={run_dir}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "model.n_hidden=32 in the checkpoint but 64 now" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert snapshot(run_dir) == before


def test_a_resumed_run_keeps_its_csv_log(names_file, tmp_path):
    import csv

    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *[o for o in SMALL if not o.startswith(("trainer.max_steps", "val_every"))],
              "val_every=10"]
    run_training(run_dir, [*common, "trainer.max_steps=20"])
    run_training(run_dir, [*common, "trainer.max_steps=40", f"ckpt_path={run_dir}"])
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        validated = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("loss/val")})
    assert validated == [10, 20, 30, 40]  # Lightning's writer deleted the rows before the resume


# --- a requeued SLURM job continues its own run -----------------------------------------------------
def fake_slurm(monkeypatch, tmp_path, job: str, restart: int) -> Path:
    """SLURM's variables for one task of job ``job``, and an ``scontrol`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": str(restart), "SLURM_NTASKS": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_JOB_NAME": "genlab", "SLURM_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "scontrol.log"


def test_a_preempted_slurm_job_saves_once_requeues_and_its_requeued_start_ends_where_a_straight_run_ends(
        names_file, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    common = [f"data.path={names_file}", *STOPPABLE, "num_samples=0"]
    # the same command both times (the requeue runs the job's script again): armed in the first only
    common += ["+callbacks.kill._target_=conftest.SignalInJob", "+callbacks.kill.where=train",
               f"+callbacks.kill.signum={int(signal.SIGUSR1)}", "+callbacks.kill.at=3"]
    requeues = fake_slurm(monkeypatch, tmp_path, job="777", restart=0)
    monkeypatch.setenv("GENLAB_TEST_SIGNAL_JOB", run_dir.name)
    with pytest.raises(SystemExit) as stopped:
        train(compose_config(common, run_dir))
    monkeypatch.delenv("GENLAB_TEST_SIGNAL_JOB")
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 at step 30" in capsys.readouterr().err
    assert requeues.read_text().split() == ["requeue", "777"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 30
    assert not list(run_dir.glob("hpc_ckpt_*"))  # one checkpoint, at a step boundary: Lightning's handler is not in place

    fake_slurm(monkeypatch, tmp_path, job="777", restart=1)  # the requeued job: the same command, no ckpt_path
    resumed = run_training(run_dir, common)
    assert json.loads((run_dir / ".hydra" / "slurm.json").read_text()) == {"job_id": "777", "restart_count": 1}

    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_NTASKS"):
        monkeypatch.delenv(name)
    straight = run_training(tmp_path / "straight", common)
    assert resumed["steps"] == straight["steps"] == 60
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)

    before = snapshot(run_dir)  # another SLURM job in that folder is refused, without writing
    fake_slurm(monkeypatch, tmp_path, job="778", restart=0)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_config(common, run_dir))
    assert snapshot(run_dir) == before


def test_the_same_slurm_job_with_other_settings_is_refused(names_file, tmp_path, monkeypatch):
    """The found case: a matching SLURM job id alone made any folder "this job's", so a second
    command with another learning rate was "kept" without running; the job counts only with its plan."""
    run_dir = tmp_path / "run"
    fake_slurm(monkeypatch, tmp_path, job="777", restart=0)
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="already holds a run.*optimizer.lr"):
        train(compose_config([f"data.path={names_file}", *SMALL, "optimizer.lr=0.5"], run_dir))
    assert snapshot(run_dir) == before
    train(compose_config([f"data.path={names_file}", *SMALL], run_dir))  # the same plan: kept as it is
    assert snapshot(run_dir) == before


def test_the_newest_complete_checkpoint_is_resumed_whichever_path_saved_it(tmp_path):
    from genlab.run.runs import newest_checkpoint

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 10}, tmp_path / "checkpoints" / "last.ckpt")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 12}, tmp_path / "hpc_ckpt_1.ckpt")
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", (time.time() + 5, time.time() + 5))
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    whole = (tmp_path / "hpc_ckpt_1.ckpt").read_bytes()
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(whole[: len(whole) // 2])  # cut short by a kill: skipped
    os.utime(tmp_path / "hpc_ckpt_2.ckpt", (time.time() + 9, time.time() + 9))
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
