"""Distributed training on this machine: ranks see different batches and evaluate each example
once, `trainer=ddp_cpu` end to end, and a simulated 2-node run that matches a 2-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, hparams_of, training_loop

from genlab.data.batches import FixedBatches, SequenceBatches, StreamBatches, WindowBatches

TINY = ["model=mlp", "data.batch_size=8", "trainer.max_steps=200", "val_every=100", "loop.updates_per_step=50",
        "num_samples=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "threads=1"]
SHORT = ["trainer.max_steps=40", "val_every=20", "loop.updates_per_step=5",
         *(o for o in TINY if not o.startswith(("trainer.max_steps=", "val_every=", "loop.updates_per_step=")))]


def rows_of(batches) -> list[tuple]:
    """Each batch of a stream as a hashable tuple of its rows."""
    return [tuple(map(tuple, x.tolist())) for x, _ in batches]


@pytest.mark.parametrize("make", [
    lambda rep: SequenceBatches(torch.arange(96).view(48, 2), torch.zeros(48, 2), 4, seed=1, loop=training_loop(*rep)),
    lambda rep: WindowBatches(torch.arange(500), 6, 4, seed=1, loop=training_loop(*rep)),
])
def test_ranks_take_different_batches_that_together_make_the_single_process_stream(make):
    single = list(make((0, 1)))
    rank0, rank1 = list(make((0, 2))), list(make((1, 2)))
    assert len(rank0) == len(rank1)
    assert not set(rows_of(rank0)) & set(rows_of(rank1))
    # update p of rank r is global batch 2p + r: the first updates of both ranks are the single stream's first batches
    first_single = [x for x, _ in single][:4]
    first_ranks = [rank0[0][0], rank1[0][0], rank0[1][0], rank1[1][0]]
    assert all(torch.equal(a, b) for a, b in zip(first_single, first_ranks))


def test_each_rank_reads_its_own_text_streams():
    text = torch.arange(1000)
    rank0 = next(iter(StreamBatches(text, 10, 3, loop=training_loop(0, 2))))[0]
    rank1 = next(iter(StreamBatches(text, 10, 3, loop=training_loop(1, 2))))[0]
    assert not set(rank0.flatten().tolist()) & set(rank1.flatten().tolist())
    assert rank0[:, 0].tolist() == [0, 160, 320] and rank1[:, 0].tolist() == [480, 640, 800]


def test_evaluation_covers_every_example_once_with_as_many_batches_on_every_rank():
    x, y = torch.arange(50).view(25, 2), torch.arange(50).view(25, 2)
    shards = [list(FixedBatches(x, y, 4, replica=(r, 2))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    seen = sorted(v for shard in shards for _, yb in shard for v in yb[yb >= 0].tolist())
    assert seen == list(range(50))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, env=None):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out + err


def test_ddp_cpu_and_a_simulated_two_node_run_train_to_the_same_loss(names_file, tmp_path):
    common = [f"data.path={names_file}", f"paths.data_dir={tmp_path / 'data'}", *TINY]
    ddp_dir = tmp_path / "ddp"
    finish(launch(["trainer=ddp_cpu", f"hydra.run.dir={ddp_dir}", *common], {"MASTER_PORT": str(free_port())}))
    ddp = json.loads((ddp_dir / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == 200 and ddp["status"] == "completed"
    assert len((ddp_dir / "samples.txt").read_text().split()) == 3  # written once, by rank 0
    assert not [p for p in tmp_path.iterdir() if p.name not in ("ddp", "data", "names.txt")]  # no stray run folders
    logged, _ = hparams_of(ddp_dir)  # what TensorBoard's HPARAMS tab shows
    assert logged["data.global_batch_size"] == 16 and logged["trainer.world_size"] == 2

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    port = str(free_port())
    processes = [launch(["trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                         "trainer.num_nodes=2", f"hydra.run.dir={node}", *common],
                        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank), "LOCAL_RANK": "0"})
                 for rank, node in enumerate(nodes)]
    for process in processes:
        finish(process)
    two_nodes = json.loads((nodes[0] / "metrics.json").read_text())
    assert not (nodes[1] / "metrics.json").exists()  # only global rank 0 writes
    assert two_nodes["world_size"] == 2
    assert two_nodes["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)
    assert two_nodes["test_loss"] == pytest.approx(ddp["test_loss"], rel=1e-5)


def test_a_multirun_of_ddp_jobs_is_refused_with_what_to_do_instead(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "-m", "trainer=ddp_cpu", "optimizer.lr=0.01,0.1",
                           f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot run inside a Hydra multirun" in done.stderr and "hydra/launcher=slurm" in done.stderr
    assert "Traceback" not in done.stderr


# --- processes started apart agree before they start -----------------------------------------------
def apart(rank: int, launcher: str, port: str, job: str = "4242") -> dict:
    """The environment SLURM's srun (job ``job``) or torchrun gives process ``rank`` of 2 on one node."""
    if launcher == "slurm":
        return {"SLURM_JOB_ID": job, "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_NAME": "genlab",
                "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return {"TORCHELASTIC_RUN_ID": "none", "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def test_processes_started_apart_learn_the_first_ones_decision_and_all_stop_when_it_refuses(names_file, tmp_path):
    from conftest import snapshot

    run_dir = tmp_path / "run"
    args = ["trainer=ddp_cpu", f"hydra.run.dir={run_dir}", f"data.path={names_file}", f"paths.data_dir={tmp_path / 'data'}",
            *TINY]
    port = str(free_port())
    for process in [launch(args, apart(rank, "slurm", port)) for rank in range(2)]:
        finish(process)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["status"] == "completed"
    assert json.loads((run_dir / ".hydra" / "slurm.json").read_text()) == {"job_id": "4242", "restart_count": 0}

    before = snapshot(run_dir)
    for launcher in ("slurm", "torchrun"):  # another job in that folder: the first refuses, the other learns it
        port = str(free_port())
        processes = [launch(args, apart(rank, launcher, port, job="4243")) for rank in range(2)]
        errors = []
        for process in processes:
            out, err = process.communicate(timeout=300)  # none waits for a process that left
            assert process.returncode == 1, err[-3000:]
            errors.append([line for line in err.splitlines() if line.startswith("error: ")])
        assert errors[0] == errors[1] and f"{run_dir} already holds a run" in errors[0][0], errors
        assert snapshot(run_dir) == before
    # the same launch again (torchrun's run id and port, SLURM's job, as a user's retry gives them) in a
    # free folder: the earlier launch's refusal is not read, the run goes ahead
    args[1] = f"hydra.run.dir={tmp_path / 'again'}"
    for process in [launch(args, apart(rank, "torchrun", port, job="4243")) for rank in range(2)]:
        finish(process)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["status"] == "completed"
    assert not (REPO / "outputs" / ".ranks").exists()  # nothing on disk carries a decision


# --- every launch agrees with Lightning on ranks ----------------------------------------------------
SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "genlab", "SLURM_NODELIST": "127.0.0.1"}
LAUNCHES = {  # name: (environment, trainer.devices, trainer.num_nodes, genlab's (rank, world, apart))
    "Lightning's own processes (first)": ({}, 2, 1, (0, 2, False)),
    "srun tasks": ({**SLURM_TASK, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2",
                    "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}, 2, 2, (3, 4, True)),
    "torchrun": ({"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
                  "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                 2, 1, (1, 2, True)),
    "srun x torchrun": ({**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
                         "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                         "TORCHELASTIC_RUN_ID": "77", "RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1",
                         "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                        2, 2, (2, 4, True)),
    "torchrun inside sbatch": ({**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
                                "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                                "TORCHELASTIC_RUN_ID": "none", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
                                "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": "29500"}, 2, 1, (1, 2, True)),
    "one command per node": ({"NODE_RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                             1, 2, (1, 2, True)),
    "one process": ({}, 1, 1, (0, 1, False)),
}
LAUNCH_VARIABLES = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GENLAB_START")


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_every_launch_combination_agrees_with_lightning_on_rank_and_world_size(name, monkeypatch):
    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    from genlab.run.ranks import launch

    # DDP's set_world_ranks makes this process "rank r" for Lightning's rank-zero-only logging, a
    # global the later tests' runs would keep (their loggers would write nothing)
    for flag in (rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(flag, "rank", getattr(flag, "rank", 0))
    environment, devices, nodes, expected = LAUNCHES[name]
    for variable in [v for v in os.environ if v.startswith(LAUNCH_VARIABLES)]:
        monkeypatch.delenv(variable)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    trainer_cfg = {"accelerator": "cpu", "devices": devices, "num_nodes": nodes}
    ours = launch(trainer_cfg)
    assert (ours.rank, ours.world, ours.apart) == expected
    trainer = L.Trainer(strategy="ddp" if ours.world > 1 else "auto", logger=False, enable_checkpointing=False,
                        **trainer_cfg)
    if ours.world > 1:
        trainer.strategy.set_world_ranks()  # what DDP does when it sets up
        assert type(trainer.strategy.cluster_environment).__name__ == ours.environment
    assert (trainer.global_rank, trainer.world_size) == (ours.rank, ours.world)


# --- no process waits for one that failed ------------------------------------------------------------
def torchrun(args, env=None):
    """Real torchrun, two processes on this machine."""
    command = [str(REPO / ".venv" / "bin" / "torchrun") if (REPO / ".venv" / "bin" / "torchrun").exists()
               else os.path.join(os.path.dirname(sys.executable), "torchrun"),
               "--nproc-per-node=2", "--standalone", "train.py", *args]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


FAULTS = {  # name: (how launched, the command's extra settings, a folder prepared, what the failing process says)
    "rank 0 cannot write train.log at start": ("slurm", [], "train.log", "Is a directory"),
    "a full disk on rank 0's save": ("slurm", ["+callbacks.fault.rank=0", "+callbacks.fault.kind=disk"], None,
                                     "is full (No space left on device)"),
    "a non-finite loss on rank 1 only": ("torchrun", ["+callbacks.fault.rank=1", "+callbacks.fault.kind=loss"],
                                         None, "the training loss became nan"),
    # Lightning's own processes: its launcher's observer ends the first process (SIGKILL) once a child fails
    "a process Lightning starts fails before it sets up": ("lightning", ["+callbacks.fault.rank=1",
                                                                         "+callbacks.fault.kind=start"],
                                                           None, "process 1 cannot start"),
}


def test_processes_failing_at_once_tell_the_first_failure_whichever_wins():
    """A non-finite gradient, averaged over the processes, makes every loss non-finite: both fail
    together. Whichever records first, the other says it followed that one, and the first does not
    wait out its acknowledgement time (the real race, with torchrun, is in the test below)."""
    import threading

    import torch.distributed as dist

    from genlab.errors import GenlabError
    from genlab.run.ranks import ACK_S, Launch, Ranks

    for attempt in range(10):
        store = dist.TCPStore("127.0.0.1", free_port(), 2, is_master=True, wait_for_workers=False)
        processes = []
        for rank in range(2):
            ranks = Ranks()
            ranks.launch, ranks.store, ranks.prefix = Launch(rank=rank, world=2, apart=True), store, f"t{attempt}/"
            processes.append(ranks)
        together, ends = threading.Barrier(2), [None, None]

        def fail(rank):
            together.wait()
            started = time.monotonic()
            try:
                processes[rank].__exit__(RuntimeError, RuntimeError(f"loss nan on {rank}"), None)
                ends[rank] = ("own", time.monotonic() - started)
            except GenlabError as err:
                ends[rank] = (str(err), time.monotonic() - started)

        threads = [threading.Thread(target=fail, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        first = [rank for rank in range(2) if ends[rank][0] == "own"]
        assert len(first) == 1, ends
        follower = 1 - first[0]
        assert ends[follower][0] == (f"process {first[0]} of 2 failed, so this one stopped too: "
                                     f"RuntimeError: loss nan on {first[0]}"), ends
        assert ends[first[0]][1] < ACK_S, ends  # acknowledged, not timed out


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_failure_on_one_process_ends_every_process_with_its_message(name, names_file, tmp_path):
    how, fault, prepared, message = FAULTS[name]
    run_dir = tmp_path / "run"
    if prepared:
        (run_dir / prepared).mkdir(parents=True)  # rank 0's open() fails on it
    if fault:
        fault = ["+callbacks.fault._target_=rank_faults.Fault", "+callbacks.fault.at=10", *fault]
    args = ["trainer=ddp_cpu", f"hydra.run.dir={run_dir}", f"data.path={names_file}",
            f"paths.data_dir={tmp_path / 'data'}", *SHORT, *fault]
    tests = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    if how == "lightning":  # one command, as a user starts trainer=ddp_cpu; its children share its output
        process = launch(args, {**tests, "MASTER_PORT": str(free_port())})
        out, err = process.communicate(timeout=240)
        assert process.returncode != 0, err[-3000:]
        assert message in out + err, err[-3000:]
        # the first process, waiting in the process group for the child, was ended by Lightning's
        # observer; its train.log says which process ended it, and why
        log = (run_dir / "train.log").read_text()
        assert "terminated with code 1" in log
        said = [line for line in log.splitlines() if "process 1 of 2 failed before its trainer set up" in line]
        assert said and message in said[0], log[-3000:]
        print(f"\n{name}: every process ended {time.monotonic() - started:.0f} s after the start")
        return
    if how == "slurm":
        port = str(free_port())
        processes = [launch(args, {**apart(rank, how, port), **tests}) for rank in range(2)]
        with ThreadPoolExecutor(max_workers=2) as pool:  # a hang fails here, not the suite
            ends = list(pool.map(lambda p: (*p.communicate(timeout=240), time.monotonic()), processes))
        outputs = [(out, err) for out, err, _ in ends]
        assert all(p.returncode == 1 for p in processes), [err[-2000:] for _, err in outputs]
        said = [out + err for out, err in outputs]
        print(f"\n{name}: the other process ended {abs(ends[0][2] - ends[1][2]):.1f} s after the failing one")
    else:
        process = torchrun(args, tests)
        out, err = process.communicate(timeout=240)
        assert process.returncode == 1, err[-3000:]
        said = [line for line in (out + err).splitlines() if "error: " in line]
        said = ["\n".join(line for line in said if "stopped too" in line),
                "\n".join(line for line in said if "stopped too" not in line)]
    print(f"\n{name}: every process ended {time.monotonic() - started:.0f} s after the start")  # measured only
    for text in said:  # the failing process says what failed, and so does the other
        assert message in text, text[-3000:]
    assert "stopped too" in "".join(said)
    if fault:  # the run's folder says it too
        assert message in (run_dir / "train.log").read_text()


# --- several processes inside -m -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["trainer=ddp_cpu"], ["trainer.devices=2"], ["trainer=ddp", "trainer.devices=-1"],
    ["trainer.devices=2", "+trainer.strategy=fsdp"], ["trainer.devices=2", "+trainer.strategy=deepspeed"],
    ["trainer=multinode", "trainer.accelerator=cpu", "trainer.precision=32-true"],
], ids=" ".join)
def test_every_setting_that_makes_lightning_start_processes_is_refused_inside_a_multirun(overrides, tmp_path,
                                                                                         monkeypatch):
    from conftest import compose_config

    import genlab.run.checks
    from genlab.errors import ConfigError

    for variable in [v for v in os.environ if v.startswith(LAUNCH_VARIABLES)]:
        monkeypatch.delenv(variable)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # devices=-1: every GPU of a 2-GPU machine
    monkeypatch.setattr(genlab.run.checks, "in_sweep", lambda: True)
    cfg = compose_config(overrides, tmp_path / "run")
    for launcher in ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                     "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"):
        monkeypatch.setattr(genlab.run.checks, "launcher_target", lambda: launcher)
        with pytest.raises(ConfigError, match=r"trains in \d processes.*cannot run inside a Hydra multirun"):
            genlab.run.checks.check_processes_in_sweep(cfg)
    monkeypatch.setattr(genlab.run.checks, "launcher_target", lambda: "hydra_plugins.hydra_submitit_launcher.x")
    genlab.run.checks.check_processes_in_sweep(cfg)  # SLURM starts a job's processes itself
    genlab.run.checks.check_processes_in_sweep(compose_config(["trainer=cpu"], tmp_path / "one"))  # one process: fine
