"""Runs against a real two-node SLURM with accounting (``make test-cluster``: ``tests/cluster/run.sh``
starts it with ``cluster.sh``, a PostgreSQL server beside it, and stops both). Not collected by
``make test``: it needs root and those daemons.

Four launches start at once. The same 2-node x 1-process training (gloo DDP on the CPU,
``trainer=multinode`` on hosts gl-node1 and gl-node2) is launched three ways, and every way ends at
the same step count and losses:

- (a) a 2-job ``hydra/launcher=slurm`` sweep, identical but for the names; one job is pre-empted with
  SIGUSR1 after its first checkpoint, requeued and resumed; the other is left alone;
- (b) ``torchrun --nnodes=2``, one agent in each node's namespace, c10d rendezvous;
- (c) ``sbatch`` + ``srun python train.py`` without ``hydra.run.dir``, its batch shell trapping
  SIGUSR1 as ``conf/trainer/multinode.yaml`` shows, pre-empted with ``scancel --signal=USR1 --full``
  (the batch shell gets it too) and requeued: it continues in the folder it started;
and (d) ``srun`` starting a ``torchrun`` agent of two processes on each node (4 processes) and (f)
``torchrun`` of two processes run by the batch script itself (one SLURM task) agree on their world
and train. Then (e) a sweep job that FAILED before train.py ends the sweep driver's
wait within a minute, with the job's error (submitit reads the state from accounting); the sweep of
(a) over its own folder with another setting is refused on every process of every job; two Optuna
workers share one PostgreSQL study."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, snapshot

CLUSTER_SH = str(REPO / "tests" / "cluster" / "cluster.sh")
NODES = ("gl-node1", "gl-node2")
MULTINODE = ["trainer=multinode", "trainer.accelerator=cpu", "trainer.precision=32-true"]  # 2 nodes x 1 process
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=20"]
# a few hundred updates of the smallest model: long enough to be pre-empted after its first
# checkpoint (every 100 updates)
TRAINING = ["model=mlp", "data.batch_size=8", "trainer.max_steps=600", "val_every=100", "loop.updates_per_step=10",
            "num_samples=0", "trainer.enable_progress_bar=false", "callbacks.insight=null", "threads=1"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def wait_for(condition, what: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(1)
    return found


def sacct(job: str, fields: str) -> str:
    """The job's own line in SLURM's accounting (its latest attempt)."""
    done = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", fields], capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def preempt_at_first_checkpoint(root: Path, pattern: str, full: bool = False) -> tuple[str, str, Path]:
    """Waits for the first ``root/<pattern>/checkpoints/last.ckpt`` and sends SIGUSR1 to that run's
    SLURM job (its processes, as SLURM does before the time limit; ``full``: its batch shell too, as
    ``--signal=B:USR1@120`` does); returns the job's id (as
    ``SLURM_JOB_ID`` gives it), its name for scancel and sacct (``<array>_<task>`` in a job array:
    an array task's own id can be the array's, which names every task) and the run's folder."""
    run = wait_for(lambda: next((p.parents[1] for p in root.glob(f"{pattern}/checkpoints/last.ckpt")), None),
                   f"first checkpoint under {root}")
    job = json.loads((run / ".hydra" / "slurm.json").read_text())["job_id"]
    queue = subprocess.run(["squeue", "-h", "-o", "%A %i"], capture_output=True, text=True, check=True, timeout=60)
    name = dict(line.split() for line in queue.stdout.splitlines())[job]
    subprocess.run(["scancel", "--signal=USR1", *(["--full"] if full else []), name], check=True, timeout=60)
    return job, name, run


def made_up_names(path: Path) -> Path:
    """300 names of two or three syllables (the module's runs share one file)."""
    syllables = ["ma", "ri", "lu", "ca", "gio", "van", "na", "to", "el", "sa", "be", "tta", "o", "an"]
    names = ["".join(p) for n in (2, 3) for p in itertools.product(syllables, repeat=n)][::9][:300]
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


def batch_shell_lines() -> tuple[str, str]:
    """The batch script's trap and wait lines that conf/trainer/multinode.yaml tells users to write."""
    lines = [line[len("#   "):] for line in (REPO / "conf" / "trainer" / "multinode.yaml").read_text().splitlines()
             if line.startswith("#   ")]
    return next(line for line in lines if line.startswith("trap ")), next(line for line in lines if line.startswith("wait "))


@dataclass
class Launches:
    root: Path
    data: list[str]
    sweep_command: list[str]
    sweep: subprocess.Popen
    torchrun: list[subprocess.Popen]
    srun_job: str
    srun_torchrun_job: str
    torchrun_in_sbatch_job: str
    preempted: dict[str, Future]
    sweep_output: list[str] = field(default_factory=list)

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    def sweep_result(self) -> str:
        """The sweep driver's output, once it has ended (with exit status 0)."""
        if not self.sweep_output:
            out, _ = self.sweep.communicate(timeout=1500)
            assert self.sweep.returncode == 0, out[-4000:]
            self.sweep_output.append(out)
        return self.sweep_output[0]

    def alone(self) -> dict:
        """The metrics of the sweep's job left alone: what every launch of the same run ends at."""
        self.sweep_result()
        return json.loads((self.sweep_dir / "0-name=alone" / "metrics.json").read_text())


def same_run(metrics: dict, alone: dict) -> None:
    assert metrics["world_size"] == alone["world_size"] == 2
    assert metrics["steps"] == alone["steps"] == 600
    assert metrics["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
    assert metrics["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """(a), (b), (c), (d) and (f) started together, so that the requeues' waits overlap the other runs."""
    root = tmp_path_factory.mktemp("launches")
    names = made_up_names(root / "names.txt")
    data = [f"data.path={names}", f"paths.data_dir={root / 'data'}"]
    sweep_command = [sys.executable, "train.py", "-m", *SLURM, *MULTINODE, *TRAINING, *data, "name=alone,preempted",
                     f"hydra.sweep.dir={root / 'sweep'}"]
    sweep = subprocess.Popen(sweep_command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    torchrun_id = uuid.uuid4().hex[:12]
    torchrun = [subprocess.Popen(
        [CLUSTER_SH, "on", node, sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={NODES[0]}:29400", f"--rdzv-id={torchrun_id}",
         "train.py", *MULTINODE, *TRAINING, *data, "name=torchrun", f"hydra.run.dir={root / 'torchrun'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in NODES]

    # as a user writes it: no hydra.run.dir, the job requeueable, run from its own project folder, and
    # the batch shell trapping SIGUSR1 as conf/trainer/multinode.yaml shows (it gets the signal too)
    srun_dir = root / "srun"
    srun_dir.mkdir()
    script = srun_dir / "job.sh"
    trap, wait = batch_shell_lines()
    script.write_text("\n".join(["#!/bin/bash", trap, " ".join(["srun", sys.executable, str(REPO / "train.py"),
                                  *MULTINODE, *TRAINING, *data, "name=srun", "& step=$!"]), wait]) + "\n")
    srun_job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={srun_dir}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--mem=1G", "--requeue", "--open-mode=append", f"--output={srun_dir}/slurm-%j.out", str(script)],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    # (d) srun x torchrun: one SLURM task per node, each a torchrun agent of two processes (4 in all)
    torchrun_dir = root / "srun-torchrun"
    torchrun_dir.mkdir()
    script = torchrun_dir / "job.sh"
    script.write_text("#!/bin/bash\nfirst=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n" + " ".join(
        ["srun", sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
         "--rdzv-backend=c10d", '--rdzv-endpoint="$first:29500"', '--rdzv-id="$SLURM_JOB_ID"', str(REPO / "train.py"),
         *MULTINODE, "trainer.devices=2", *TRAINING, "trainer.max_steps=200", *data, "name=srun-torchrun",
         f"hydra.run.dir={torchrun_dir / 'run'}"]) + "\n")
    # a launch whose processes disagree on the world waits in the process group: the time limit ends it
    srun_torchrun_job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={torchrun_dir}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--mem=1G", "--time=10", f"--output={torchrun_dir}/slurm-%j.out", str(script)],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    # (f) torchrun inside sbatch: the batch script's one SLURM task runs a torchrun agent of two processes
    inside_dir = root / "torchrun-in-sbatch"
    inside_dir.mkdir()
    script = inside_dir / "job.sh"
    script.write_text("#!/bin/bash\n" + " ".join(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(REPO / "train.py"),
         *MULTINODE, "trainer.num_nodes=1", "trainer.devices=2", *TRAINING, "trainer.max_steps=200", *data,
         "name=torchrun-in-sbatch", f"hydra.run.dir={inside_dir / 'run'}"]) + "\n")
    torchrun_in_sbatch_job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={inside_dir}", "--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--mem=1G",
         "--time=10", f"--output={inside_dir}/slurm-%j.out", str(script)],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    with ThreadPoolExecutor(max_workers=2) as pool:
        preempted = {"sweep": pool.submit(preempt_at_first_checkpoint, root / "sweep", "1-name=preempted"),
                     "srun": pool.submit(preempt_at_first_checkpoint, srun_dir / "outputs" / "runs", "*/*/*", True)}
        yield Launches(root, data, sweep_command, sweep, torchrun, srun_job, srun_torchrun_job, torchrun_in_sbatch_job,
                       preempted)
    for process in (sweep, *torchrun):
        if process.poll() is None:
            process.kill()


def test_a_preempted_two_node_sweep_job_is_requeued_and_ends_where_the_job_left_alone_ends(launches):
    job, name, job_dir = launches.preempted["sweep"].result(timeout=900)
    out = launches.sweep_result()
    assert "sweep: all 2 jobs completed" in out
    assert "Bypassing sacct error" not in out  # accounting answers the launcher's sacct calls
    assert sacct(name, "NodeList") == "gl-node[1-2]"  # one process on each node
    # the driver reads the job's result file; accounting records the job's end a moment later
    assert wait_for(lambda: (s := sacct(name, "State")) in ENDED and s, f"end of job {name}", timeout=120) == "COMPLETED"
    alone_record = json.loads((launches.sweep_dir / "0-name=alone" / ".hydra" / "slurm.json").read_text())
    assert alone_record["restart_count"] == 0  # the signal reached the pre-empted job alone

    record = json.loads((job_dir / ".hydra" / "slurm.json").read_text())
    assert record == {"job_id": job, "restart_count": 1}  # requeued once, and resumed in its own folder
    assert "Restored all states from the checkpoint" in (job_dir / "train.log").read_text()
    assert not list(job_dir.glob("hpc_ckpt_*"))  # one checkpoint, genlab's, at a step boundary
    preempted, alone = json.loads((job_dir / "metrics.json").read_text()), launches.alone()
    same_run(preempted, alone)
    print(f"pre-empted job {job}: val_loss {preempted['val_loss']:.6f}, left alone {alone['val_loss']:.6f}")


def test_b_torchrun_with_an_agent_on_each_node_ends_where_the_slurm_job_ends(launches):
    for agent in launches.torchrun:
        out, _ = agent.communicate(timeout=1500)
        assert agent.returncode == 0, out[-4000:]
    same_run(json.loads((launches.root / "torchrun" / "metrics.json").read_text()), launches.alone())


def completed(job: str, folder: Path) -> None:
    """Wait for the batch job to end, and check that it COMPLETED (else fail with its output's end)."""
    state = wait_for(lambda: (s := sacct(job, "State")) in ENDED and s, f"end of job {job}", timeout=1500)
    log = "".join(p.read_text() for p in folder.glob("slurm-*.out"))
    assert state == "COMPLETED", log[-4000:]


def test_c_sbatch_and_srun_without_a_run_dir_continue_in_the_same_folder_when_requeued(launches):
    job, _, run = launches.preempted["srun"].result(timeout=900)
    assert job == launches.srun_job
    completed(job, launches.root / "srun")
    folders = sorted(p.parents[1].relative_to(launches.root) for p in (launches.root / "srun").rglob(".hydra/config.yaml"))
    assert folders == [run.relative_to(launches.root)], f"the requeued job ran in {folders}, not only in {run}"
    assert json.loads((run / ".hydra" / "slurm.json").read_text()) == {"job_id": job, "restart_count": 1}
    assert "Restored all states from the checkpoint" in (run / "train.log").read_text()
    same_run(json.loads((run / "metrics.json").read_text()), launches.alone())


def test_d_srun_starting_a_torchrun_agent_on_each_node_agrees_on_four_processes(launches):
    completed(launches.srun_torchrun_job, launches.root / "srun-torchrun")
    metrics = json.loads((launches.root / "srun-torchrun" / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and metrics["steps"] == 200 and metrics["status"] == "completed"


def test_f_torchrun_inside_sbatch_agrees_on_its_two_processes_not_on_slurms_one_task(launches):
    completed(launches.torchrun_in_sbatch_job, launches.root / "torchrun-in-sbatch")
    metrics = json.loads((launches.root / "torchrun-in-sbatch" / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 200 and metrics["status"] == "completed"


def test_e_a_failed_job_ends_the_sweep_drivers_wait_with_its_error(tmp_path):
    """Without accounting the driver cannot tell a job that died from one that runs and waits forever;
    with it, sacct says FAILED and the driver stops with the job's error stream."""
    names = made_up_names(tmp_path / "names.txt")
    command = [sys.executable, "train.py", "-m", *SLURM, *MULTINODE, *TRAINING, f"data.path={names}",
               f"paths.data_dir={tmp_path / 'data'}", "name=fails",
               'hydra.launcher.setup=["echo cluster-check: this job fails before train.py >&2; exit 3"]',
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    driver = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    ended = time.time()
    out = driver.stdout + driver.stderr
    assert driver.returncode != 0, out[-4000:]
    assert "state: FAILED" in out and "cluster-check: this job fails before train.py" in out, out[-4000:]
    job = re.search(r"Job (\d+(?:_\d+)?) \(task: 0\) with path", out).group(1)  # submitit's message names it
    state, end = sacct(job, "State,End").split("|")
    assert state == "FAILED"
    waited = ended - datetime.fromisoformat(end).timestamp()  # sacct's times are this machine's local time
    assert waited < 60, f"the driver went on waiting {waited:.0f} s after its job FAILED"


def test_a_sweep_over_its_folder_with_another_setting_is_refused_on_every_process(launches):
    sweep = launches.sweep_dir
    launches.sweep_result()
    before = {name: snapshot(sweep / name) for name in ("0-name=alone", "1-name=preempted")}
    submitted = {p.name for p in (sweep / ".submitit").iterdir()}
    refused = subprocess.run([*launches.sweep_command, "trainer.max_steps=200"], cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "sweep: 0 of 2 jobs completed" in refused.stderr and "0-name=alone refused: " in refused.stderr
    assert {name: snapshot(sweep / name) for name in before} == before  # nothing written into the runs it found
    logs = [p for p in (sweep / ".submitit").iterdir() if p.name not in submitted and re.fullmatch(r"\d+_\d+", p.name)]
    assert len(logs) == 2  # <array job>_<task>: one folder per job
    for job_logs in logs:
        for rank in (0, 1):  # each process, one on each node, ended with the first one's refusal
            text = "".join(p.read_text() for p in job_logs.glob(f"*_{rank}_log.*"))
            assert "this job refused: " in text and "holds a run of another plan" in text, text[-2000:]


def test_two_optuna_workers_share_one_postgresql_study(launches, tmp_path):
    import optuna

    storage = os.environ["GENLAB_OPTUNA_DB"]  # a Unix socket in cluster.sh's private folder, with a password
    workers = [subprocess.Popen(
        [sys.executable, "train.py", "hparams_search=names_mlp_optuna", *launches.data, "hydra.sweeper.n_trials=2",
         f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=cluster",
         f"hydra.sweep.dir={tmp_path / f'worker{i}'}", "scheduler.milestones=[1000]", *TRAINING,
         "trainer.max_steps=200"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="cluster", storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
