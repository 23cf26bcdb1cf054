"""Sweeps end to end, as a user runs them: a 2x2 grid with Hydra's multirun, a 3-trial Optuna
study with one diverging trial, the comparison report on both, and TensorBoard's HPARAMS data
read back from the event files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, hparams_of
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

from genlab.results.compare import compare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = ["data.batch_size=8", "trainer.max_steps=200", "val_every=100", "loop.updates_per_step=100",
        "num_samples=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.insight=null", "threads=1"]


def run(args: list[str], tmp_path: Path, status: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "train.py", *args, f"paths.data_dir={tmp_path / 'data'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == status, done.stderr[-3000:]
    return done


def job_dir(sweep: Path, number: int) -> Path:
    """A sweep job's folder: its number, then what the sweep varies (3-lr=0.1,n_embd=30)."""
    [folder] = [p for p in sweep.iterdir() if p.is_dir() and (p.name == str(number) or p.name.startswith(f"{number}-"))]
    return folder


def job_metrics(sweep: Path, jobs: int) -> list[dict]:
    return [json.loads((job_dir(sweep, i) / "metrics.json").read_text()) for i in range(jobs)]




def tensorboard_hparams(logdir: Path) -> tuple[list, list, dict]:
    """What TensorBoard's HPARAMS tab reads from a folder, through TensorBoard's own code: the hparam
    columns (in its order, each with ``differs``), the metric columns, and each run's metric values."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider))
    ctx = context.RequestContext()
    experiment = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS],
        col_params=[api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos])
    groups = list_session_groups.Handler(ctx, backend, "", request).run().session_groups
    values = {g.name.removesuffix("/tensorboard"): {m.name.tag: m.value for m in g.metric_values} for g in groups}
    return list(experiment.hparam_infos), [m.name.tag for m in experiment.metric_infos], values


# TensorBoard's HPARAMS tab shows the first five hparam and metric columns, the rest behind checkboxes
SHOWN_COLUMNS = 5


def test_a_2x2_grid_sweep_and_its_comparison(names_file, text_file, tmp_path):
    sweep = tmp_path / "outputs" / "sweep"
    run(["-m", "model=mlp", f"data.path={names_file}", "optimizer.lr=0.01,0.1", "model.n_embd=4,8",
         f"hydra.sweep.dir={sweep}", "name=grid", "tags=[mlp,lr]", *TINY], tmp_path)
    jobs = [job_dir(sweep, i) for i in range(4)]
    assert [j.name for j in jobs] == ["0-lr=0.01,n_embd=4", "1-lr=0.01,n_embd=8", "2-lr=0.1,n_embd=4", "3-lr=0.1,n_embd=8"]
    seen = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["steps"] == 200
        assert metrics["name"] == "grid" and metrics["tags"] == ["mlp", "lr"]
        assert (job / "checkpoints" / "last.ckpt").exists()
        hparams, hp_metrics = hparams_of(job)
        seen.add((hparams["optimizer.lr"], hparams["model.n_embd"]))
        assert hparams["name"] == "grid" and hparams["tags"] == "mlp,lr"
        assert hp_metrics["loss/val"] == pytest.approx(metrics["val_loss"], rel=1e-6)
        assert hp_metrics["loss/best_val"] == pytest.approx(metrics["best_val_loss"], rel=1e-6)
        assert hp_metrics["loss/test"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert seen == {(0.01, 4), (0.01, 8), (0.1, 4), (0.1, 8)}

    # HPARAMS as TensorBoard reads it: the swept parameters are the first columns, the losses the metrics
    hparams, metric_columns, values = tensorboard_hparams(sweep)
    assert [h.name for h in hparams if h.differs] == ["model.n_embd", "optimizer.lr"]
    assert [h.name for h in hparams[:2]] == ["model.n_embd", "optimizer.lr"]
    assert {"loss/best_val", "loss/test", "loss/train", "loss/val"} <= set(metric_columns[:SHOWN_COLUMNS])
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert values[job.name]["loss/val"] == pytest.approx(metrics["val_loss"], rel=1e-6)
        assert values[job.name]["loss/test"] == pytest.approx(metrics["test_loss"], rel=1e-6)

    # beside a GPT run: every parameter of every run has a column, internal keys none
    gpt = sweep.parent / "gpt"
    run(["model=gpt", "data=divina", f"data.path={text_file}", "model.n_layer=1", "model.n_head=2", "model.n_embd=8",
         "data.seq_len=8", f"hydra.run.dir={gpt}", *TINY[:2], "val_every=100", *TINY[4:]], tmp_path)
    hparams, metric_columns, values = tensorboard_hparams(sweep.parent)
    names = {h.name for h in hparams}
    assert {"model.n_layer", "model.n_head", "model.dropout", "data.tokenizer", "model.n_embd", "optimizer.lr"} <= names
    assert not [n for n in names if n.rsplit(".", 1)[-1] in ("_target_", "_partial_", "data_dir", "mirror")]
    differing = [h.name for h in hparams if h.differs]
    assert {"model", "data", "optimizer.lr", "model.n_embd"} <= set(differing)
    assert [h.name for h in hparams[:len(differing)]] == differing  # the differing ones come first
    assert {"loss/best_val", "loss/test", "loss/val"} <= set(metric_columns[:SHOWN_COLUMNS])
    assert values["gpt"]["loss/val"] == pytest.approx(json.loads((gpt / "metrics.json").read_text())["val_loss"])

    rows = compare(sweep)
    assert [k for k in rows[0] if "." in k] == ["model.n_embd", "optimizer.lr"]
    assert [r["val_loss"] for r in rows] == sorted(r["val_loss"] for r in rows)
    with open(sweep / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (sweep / "comparison.png").stat().st_size > 0


def test_an_optuna_study_survives_a_diverging_trial_and_continues_from_its_storage(names_file, tmp_path):
    import optuna

    sweep, storage = tmp_path / "study", f"sqlite:///{tmp_path / 'study.db'}"
    # a grid over three rates, the last of which makes the loss NaN at once
    args = ["-m", "hparams_search=names_mlp_optuna", f"data.path={names_file}", "hydra/sweeper/sampler=grid",
            "hydra.sweeper.params=null", "optimizer.lr=choice(0.05,0.1,1e37)", f"hydra.sweeper.storage={storage}",
            "scheduler.milestones=[1000]", *TINY]
    run([*args, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], tmp_path)
    statuses = {m["status"] for m in job_metrics(sweep, 3)}
    assert statuses == {"completed", "diverged"}
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in results

    study = optuna.load_study(study_name="names_mlp", storage=storage)
    values = sorted(t.value for t in study.trials)
    assert len(values) == 3 and values[-1] == 1e4 and values[0] < 4  # the diverged trial: large and finite

    rows = compare(sweep)
    assert rows[-1]["status"] == "diverged" and rows[0]["status"] == "completed"

    # an interrupted study goes on: the same storage and study name add trials to the old ones
    run([*args, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'more'}"], tmp_path)
    assert len(optuna.load_study(study_name="names_mlp", storage=storage).trials) == 4


def test_compare_reads_a_mix_of_single_runs(names_file, tmp_path):
    outputs = tmp_path / "outputs"
    for name, lr in (("a", "0.01"), ("b", "0.05")):
        run(["model=mlp", f"data.path={names_file}", f"optimizer.lr={lr}", f"hydra.run.dir={outputs / name}", *TINY],
            tmp_path)
    rows = compare(outputs)
    assert {r["run"] for r in rows} == {"a", "b"} and [k for k in rows[0] if "." in k] == ["optimizer.lr"]


def test_parallel_jobs_share_the_cores(names_file, tmp_path):
    sweep = tmp_path / "sweep"
    run(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "model=mlp", f"data.path={names_file}",
         "optimizer.lr=0.01,0.1", f"hydra.sweep.dir={sweep}", *[a for a in TINY if a != "threads=1"]], tmp_path)
    metrics = job_metrics(sweep, 2)
    assert all(m["status"] == "completed" for m in metrics)
    cores = __import__("os").cpu_count()
    assert [m["threads"] for m in metrics] == [max(1, cores // 2)] * 2


def test_tune_lr_plots_the_search_and_trains_with_the_suggestion(names_file, tmp_path, capsys):
    from conftest import run_training

    from genlab.run.checkpoints import read_checkpoint

    run_dir = tmp_path / "run"
    metrics = run_training(run_dir, ["model=mlp", f"data.path={names_file}", "tune_lr=true",
                                     "lr_finder.num_training=40", *TINY[:4]])
    printed = capsys.readouterr().out
    suggested = float(printed.split("suggested learning rate ")[1].split()[0])
    assert 1e-3 <= suggested <= 1.0
    assert (run_dir / "lr_find.png").exists() and metrics["steps"] == 200
    trained_with = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["optimizer"]["lr"]
    assert trained_with == pytest.approx(suggested, rel=1e-3)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "lr_find" in events.Tags()["images"]

    only = tmp_path / "only"
    metrics = run_training(only, ["model=mlp", f"data.path={names_file}", "tune_lr=true", "lr_finder.then_train=false",
                                  "lr_finder.num_training=40", *TINY[:4]])
    assert metrics["status"] == "lr_search_only" and 1e-3 <= metrics["suggested_lr"] <= 1.0
    assert not (only / "checkpoints").exists()


def test_two_runs_started_together_get_their_own_folders(names_file, tmp_path):
    """Run folders are named to the microsecond: two runs launched at once do not collide."""
    command = [sys.executable, str(REPO / "train.py"), "model=mlp", f"data.path={names_file}",
               f"paths.data_dir={tmp_path / 'data'}", *TINY]
    started = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for process in started:  # communicate reads stderr as it comes (a full pipe would block the run) and closes it
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    runs = sorted((tmp_path / "outputs" / "runs" / "mlp-names").glob("*/*/metrics.json"))
    assert len(runs) == 2 and runs[0].parent != runs[1].parent


# --- a failing job belongs to that job --------------------------------------------------------------
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]], ids=["basic", "parallel"])
def test_a_failing_job_is_recorded_and_the_other_jobs_run_to_the_end(launcher, names_file, tmp_path):
    sweep = tmp_path / "sweep"
    done = run(["-m", *launcher, "model=gpt", "model.n_layer=1", "model.n_embd=8", "model.n_head=2,3,4",
                f"data.path={names_file}", f"hydra.sweep.dir={sweep}", *[a for a in TINY if a != "threads=1"]],
               tmp_path, status=1)
    from genlab.sweeps import job_results

    jobs = list(job_results(sweep).values())  # the failed job never owned its folder: its record is beside it
    assert [j["status"] for j in jobs] == ["completed", "failed", "completed"]
    assert "n_embd=8 is not divisible by model.n_head=3" in jobs[1]["error"] and "model.n_head=3" in jobs[1]["overrides"]
    assert (sweep / "1-n_head=3.refused.json").exists() and not (sweep / "1-n_head=3").exists()
    assert (job_dir(sweep, 2) / "checkpoints" / "last.ckpt").exists()  # the job after the failure ran whole
    assert "sweep: 2 of 3 jobs completed" in done.stderr and "1-n_head=3 failed: " in done.stderr
    assert "Traceback" not in done.stderr


def test_an_optuna_study_goes_on_past_a_failing_trial(names_file, tmp_path):
    import optuna

    sweep, storage = tmp_path / "study", f"sqlite:///{tmp_path / 'study.db'}"
    done = run(["-m", "hparams_search=names_mlp_optuna", f"data.path={names_file}", "hydra/sweeper/sampler=grid",
                "hydra.sweeper.params=null", "data.batch_size=choice(8,0)", "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep}", "scheduler.milestones=[1000]",
                *[a for a in TINY if not a.startswith("data.batch_size")]], tmp_path, status=1)
    from genlab.sweeps import job_results

    jobs = job_results(sweep)  # the refused trial's record is beside its folder, which it never owned
    assert sorted(j["status"] for j in jobs.values()) == ["completed", "failed"]
    assert "data.batch_size must be a whole number of at least 1, got 0" in done.stderr
    assert (sweep / "optimization_results.yaml").exists()  # the study ended normally
    trials = optuna.load_study(study_name="names_mlp", storage=storage).trials
    states = sorted((t.state.name, t.value) for t in trials)  # a trial that never ran is no measured loss
    assert len(states) == 2 and states[0][0] == "COMPLETE" and states[0][1] < 4 and states[1] == ("FAIL", None)


# --- a sweep run again continues ------------------------------------------------------------------
def test_an_interrupted_grid_run_again_keeps_finished_jobs_resumes_the_stopped_one_and_runs_the_rest(names_file, tmp_path):
    from conftest import snapshot

    sweep = tmp_path / "sweep"
    # the same command both times; SignalInJob sends SIGINT in job 1 only while GENLAB_TEST_SIGNAL_JOB=1
    grid = ["-m", "model=mlp", f"data.path={names_file}", "optimizer.lr=0.01,0.1", "model.n_embd=4,8",
            f"hydra.sweep.dir={sweep}", *[a for a in TINY if not a.startswith("loop.updates_per_step")],
            "loop.updates_per_step=10", "+callbacks.kill._target_=conftest.SignalInJob", "+callbacks.kill.where=train",
            f"+callbacks.kill.signum={int(signal.SIGINT)}", "+callbacks.kill.at=5", f"paths.data_dir={tmp_path / 'data'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    stopped = subprocess.run([sys.executable, "train.py", *grid], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env={**env, "GENLAB_TEST_SIGNAL_JOB": "1"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by SIGINT at step 50" in stopped.stderr
    command = stopped.stderr.split("Continue the sweep (finished jobs are kept, this one resumes) with:")[1].split()
    assert command[:3] == ["python", "train.py", "-m"] and f"hydra.sweep.dir={sweep}" in command
    assert "optimizer.lr=0.01,0.1" in command and not any(a.startswith("ckpt_path") for a in command)
    assert [p.name for p in sorted(sweep.iterdir()) if p.is_dir()] == ["0-lr=0.01,n_embd=4", "1-lr=0.01,n_embd=8"]
    first = snapshot(job_dir(sweep, 0))
    assert json.loads(first["metrics.json"])["status"] == "completed"

    again = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=env)  # the printed command, as a user would run it
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: all 4 jobs completed" in again.stdout
    assert snapshot(job_dir(sweep, 0)) == first  # the finished job: reported, its folder byte for byte as it was
    assert "this job completed before" in again.stdout
    jobs = job_metrics(sweep, 4)
    assert [j["status"] for j in jobs] == ["completed"] * 4 and [j["steps"] for j in jobs] == [200] * 4
    resumed = job_dir(sweep, 1)  # from its own checkpoint, in its own folder
    assert f"Restored all states from the checkpoint at {resumed / 'checkpoints' / 'last.ckpt'}" in \
        (resumed / "train.log").read_text()

    # the same grid with another setting: every folder holds another configuration's run; all refused, none written
    before = {i: snapshot(job_dir(sweep, i)) for i in range(4)}
    other = [a if not a.startswith("trainer.max_steps=") else "trainer.max_steps=300" for a in command[3:]]
    refused = run(["-m", *other], tmp_path, status=1)
    assert {i: snapshot(job_dir(sweep, i)) for i in range(4)} == before
    assert "sweep: 0 of 4 jobs completed" in refused.stderr and "3-lr=0.1,n_embd=8 refused: " in refused.stderr
    record = json.loads((sweep / "0-lr=0.01,n_embd=4.refused.json").read_text())
    assert record["status"] == "refused" and "trainer.max_steps: 200 -> 300" in record["error"]
    assert "trainer.max_steps=300" in record["overrides"]


def test_a_sweep_run_again_with_a_bad_setting_keeps_every_finished_result(names_file, tmp_path):
    """The found case (seed=1.5), and the others of its kind found by reading: a bad ckpt_path, and a
    second sweep driver while another process holds a job's folder. Each failure happens before the
    job owns its folder: it goes beside the job in the sweep folder, the folders stay byte for byte."""
    import fcntl

    from conftest import snapshot

    sweep = tmp_path / "sweep"
    grid = ["-m", "model=mlp", f"data.path={names_file}", "name=a,b", f"hydra.sweep.dir={sweep}", *TINY]
    run(grid, tmp_path)
    before = {i: snapshot(job_dir(sweep, i)) for i in range(2)}
    assert all(json.loads(b["metrics.json"])["status"] == "completed" for b in before.values())
    for bad, error in ((["seed=1.5"], "seed must be a whole number"),
                       ([f"ckpt_path={tmp_path / 'none.ckpt'}"], "no checkpoint at")):
        failed = run([*grid, *bad], tmp_path, status=1)
        assert {i: snapshot(job_dir(sweep, i)) for i in range(2)} == before
        assert error in failed.stderr
        for i in range(2):
            record = json.loads((sweep / f"{job_dir(sweep, i).name}.refused.json").read_text())
            assert record["status"] == "failed" and error in record["error"]

    lock = os.open(job_dir(sweep, 0) / ".lock", os.O_RDWR | os.O_CREAT)  # another process writes job 0
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        held = snapshot(job_dir(sweep, 0))
        busy = run(grid, tmp_path, status=1)
        assert snapshot(job_dir(sweep, 0)) == held and snapshot(job_dir(sweep, 1)) == before[1]
        assert "0-name=a failed: another process" in busy.stderr
    finally:
        os.close(lock)
    (job_dir(sweep, 0) / ".lock").unlink()
    again = run(grid, tmp_path)  # the same sweep once more: both kept, the records beside them gone
    assert "sweep: all 2 jobs completed" in again.stdout and not list(sweep.glob("*.refused.json"))
    assert {i: snapshot(job_dir(sweep, i)) for i in range(2)} == before


def test_a_sweep_run_again_after_its_yaml_changed_is_refused_naming_the_setting(names_file, tmp_path):
    """Only the command-line overrides were compared: finished jobs kept the old configuration's
    results and .hydra/config.yaml was rewritten. The plan compares the resolved configuration."""
    from conftest import snapshot

    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\nmodel:\n  n_hidden: 16\n")
    sweep = tmp_path / "sweep"
    grid = ["-m", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=mine", "model=mlp",
            f"data.path={names_file}", "name=a,b", f"hydra.sweep.dir={sweep}", *TINY]
    run(grid, tmp_path)
    before = {i: snapshot(job_dir(sweep, i)) for i in range(2)}
    (conf / "mine.yaml").write_text("# @package _global_\nmodel:\n  n_hidden: 24\n")
    refused = run(grid, tmp_path, status=1)
    assert {i: snapshot(job_dir(sweep, i)) for i in range(2)} == before
    record = json.loads((sweep / f"{job_dir(sweep, 0).name}.refused.json").read_text())
    assert record["status"] == "refused" and "model.n_hidden: 16 -> 24" in record["error"]
    assert "new folder" in record["error"] and "overwrite=true" in record["error"]
    assert "0-name=a refused: " in refused.stderr


def test_an_optuna_study_continued_in_its_folder_names_folders_by_trial_and_fails_the_interrupted_trial(names_file,
                                                                                                        tmp_path):
    """Hydra numbers an Optuna sweep's jobs from 0 each time it starts while the study numbers its trials
    on: continued over the same folder, the study's next trial met trial 0's folder, and the trial its
    stopped sweep left RUNNING stayed so for ever. Job folders are named by trial number now, and the
    interrupted trial is marked failed, its folder left byte for byte as it was."""
    import optuna
    from conftest import snapshot

    sweep, storage = tmp_path / "study", f"sqlite:///{tmp_path / 'study.db'}"
    study = [sys.executable, "train.py", "-m", "hparams_search=names_mlp_optuna", f"data.path={names_file}",
             "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null", "optimizer.lr=choice(0.02,0.05,0.1,0.2)",
             f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
             "scheduler.milestones=[1000]", *TINY, "+callbacks.kill._target_=conftest.SignalInJob",
             "+callbacks.kill.where=train", f"+callbacks.kill.signum={int(signal.SIGINT)}", "+callbacks.kill.at=1",
             f"paths.data_dir={tmp_path / 'data'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    stopped = subprocess.run(study, cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**env, "GENLAB_TEST_SIGNAL_JOB": "1"})  # SIGINT in trial 1
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    before = {i: snapshot(job_dir(sweep, i)) for i in range(2)}
    assert (job_dir(sweep, 1) / "checkpoints" / "last.ckpt").exists() and "metrics.json" not in before[1]

    again = subprocess.run(study, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 1, again.stderr[-3000:]  # trial 1 did not complete, and the summary says so
    assert "trial 1 was left running by a sweep that stopped" in again.stdout + again.stderr
    assert f"{job_dir(sweep, 1).name}: no metrics.json" in again.stderr
    trials = {t.number: t for t in optuna.load_study(study_name="names_mlp", storage=storage).trials}
    assert {n: t.state.name for n, t in trials.items()} == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    assert sorted(int(p.name.split("-")[0]) for p in sweep.iterdir() if p.is_dir()) == [0, 1, 2, 3]
    assert {i: snapshot(job_dir(sweep, i)) for i in range(2)} == before
    for number in (2, 3):  # each new trial in its own new folder, trained with its own parameters
        plan = json.loads((job_dir(sweep, number) / ".hydra" / "plan.json").read_text())
        assert plan["config"]["optimizer"]["lr"] == trials[number].params["optimizer.lr"]
        assert json.loads((job_dir(sweep, number) / "metrics.json").read_text())["status"] == "completed"


def test_two_optuna_workers_started_together_share_one_sqlite_study(names_file, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [subprocess.Popen(
        [sys.executable, "train.py", "hparams_search=names_mlp_optuna", f"data.path={names_file}",
         "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
         f"hydra.sweep.dir={tmp_path / f'worker{i}'}", "scheduler.milestones=[1000]", *TINY,
         f"paths.data_dir={tmp_path / 'data'}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for worker in workers:  # each made its trials; neither died creating the storage
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # the workers' trial numbers interleave: each job's folder is named by its trial, one folder a trial
    folders = {int(p.name.split("-")[0]): p for i in range(2) for p in (tmp_path / f"worker{i}").iterdir() if p.is_dir()}
    assert sorted(folders) == [0, 1, 2, 3] and sum(1 for i in range(2) for p in (tmp_path / f"worker{i}").iterdir()
                                                   if p.is_dir()) == 4
    for trial in trials:
        plan = json.loads((folders[trial.number] / ".hydra" / "plan.json").read_text())["config"]
        assert plan["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert trial.user_attrs["genlab_sweep_dir"] == str(folders[trial.number].parent)


def test_only_a_trial_no_live_process_runs_is_marked_failed(tmp_path):
    """A study continued marks failed the trials a stopped sweep left RUNNING, and no other: not one a
    live worker runs (its folder locked), is about to run (not claimed yet) or has finished (its result
    not yet told, as for the jobs of a batch before the last one ends)."""
    import fcntl

    import optuna

    from genlab.sweeps import SWEEP_DIR_ATTR, fail_interrupted_trials

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    sweep = tmp_path / "sweep"
    folders = {"running": True, "stopped": True, "not claimed": False, "finished": True, "no folder": None}
    for number, (case, claimed) in enumerate(folders.items()):
        trial = study.ask()
        trial.set_user_attr(SWEEP_DIR_ATTR, str(sweep))
        if claimed is None:
            continue
        folder = sweep / f"{number}-lr=0.1"
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".lock").write_text("1")  # a killed process's lock file stays
        if claimed:
            (folder / ".hydra" / "plan.json").write_text("{}")
        if case == "finished":
            (folder / "metrics.json").write_text('{"status": "completed"}')
    lock = os.open(sweep / "0-lr=0.1" / ".lock", os.O_RDWR)  # a live process holds trial 0's folder
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fail_interrupted_trials(study)
    finally:
        os.close(lock)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["RUNNING", "FAIL", "RUNNING", "RUNNING", "RUNNING"]
