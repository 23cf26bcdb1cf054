"""The processes of one run: who they are, how they agree to start, and how they end together.

**Who.** A process's rank and the number of processes come from the cluster environment that
Lightning itself picks, in Lightning's order (torchrun's first, since it can run inside a SLURM job;
then SLURM's tasks; else ``trainer.num_nodes`` x ``trainer.devices`` with ``NODE_RANK`` and
``LOCAL_RANK``): ``launch``. genlab and Lightning therefore never disagree on ranks.

**How they start.** The first process decides how the run starts (new, resumed from which
checkpoint, a finished job kept as it is, or refused) and every other process learns that decision
before it builds anything:

- Processes that Lightning starts (``trainer=ddp`` on one machine) begin inside the first one's
  ``fit``, after the decision: they inherit it in the environment.
- Processes started apart (SLURM's tasks, torchrun, one command per node) share the store of their
  launch (torch.distributed's TCPStore at ``MASTER_ADDR:MASTER_PORT``: torchrun's own, else one the
  first process serves), which lives only as long as that launch, so no later launch can read an
  earlier one's decision, and nothing is left on disk. Once the run goes ahead, genlab initialises
  the process group on that store, and Lightning uses it as it is.

**How they end.** Whatever a process fails with, it writes its message to the store before it
ends; every other process watches the store (a thread), and on reading it prints the message, logs
it (rank 0: into ``train.log``) and ends, instead of waiting in a collective for a process that has
left. A process that ends without a word (killed) takes the first process's store with it, or is
noticed by torchrun's agent, which ends the others."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from genlab import errors
from genlab.errors import ConfigError, GenlabError

log = logging.getLogger("genlab")

DECISION = "GENLAB_START"  # the decision, for the processes Lightning starts
TIMEOUT = "GENLAB_START_TIMEOUT"  # seconds the other processes wait for the first's decision
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # torch's and Lightning's default for one collective
POLL_S = 0.2  # how often a process looks for another's failure
ACK_S = 10.0  # how long a failing process waits for the others to have read its message
LEAVE_S = 120.0  # how long the first process, at the end, waits for the others to end too


@dataclass
class Start:
    """How a run starts: from ``ckpt_path`` (None: new), ``overwrite`` what its folder held (its own
    job's earlier attempt or overwrite=true), or not at all: ``done`` (a finished job's metrics) or
    ``error`` (a refusal, with the error's class)."""

    ckpt_path: str | None = None
    overwrite: bool = False
    done: dict | None = None
    error: str | None = None
    error_type: str | None = None

    def raise_error(self) -> None:
        if self.error is not None:
            cls = getattr(errors, self.error_type or "", None)
            if not (isinstance(cls, type) and issubclass(cls, GenlabError)):
                cls = GenlabError
            raise cls(self.error)


def describe(err: BaseException) -> str:
    """One line: a library's message (Hydra's for a target that failed spans two) joined."""
    return str(err) if isinstance(err, GenlabError) else " ".join(f"{type(err).__name__}: {err}".split())


def refusal(err: BaseException) -> Start:
    message = str(err) if isinstance(err, GenlabError) else f"the first process stopped: {describe(err)}"
    return Start(error=message, error_type=type(err).__name__)


@dataclass(frozen=True)
class Launch:
    """This process in its launch: ``rank`` of ``world`` processes; ``apart``: started by SLURM,
    torchrun or one command per node (not by Lightning), so the decision travels by the store."""

    rank: int = 0
    world: int = 1
    apart: bool = False
    environment: str = "LightningEnvironment"


def cluster_environment():
    """The cluster environment Lightning's Trainer picks (``_AcceleratorConnector``), in its order."""
    from lightning.fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, MPIEnvironment,
                                                       SLURMEnvironment, TorchElasticEnvironment)

    for kind in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if kind.detect():
            try:
                return kind()
            except (RuntimeError, ValueError) as err:  # SLURM's: --ntasks without --ntasks-per-node
                raise ConfigError(f"{kind.__name__}: {err}") from None
    return LightningEnvironment()


def devices_per_node(trainer_cfg) -> int:
    """``trainer.devices`` as a count: a number, a list of devices, or -1/auto (every GPU, one CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return max(1, torch.cuda.device_count()) if accelerator in ("gpu", "cuda", "auto") else 1


def launch(trainer_cfg) -> Launch:
    """Who this process is, as Lightning will see it (``trainer.global_rank``, ``trainer.world_size``)."""
    environment = cluster_environment()
    name = type(environment).__name__
    if name == "LightningEnvironment":  # Lightning sets these itself from the trainer's settings
        per_node = devices_per_node(trainer_cfg)
        nodes = trainer_cfg.get("num_nodes", 1)
        world = per_node * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
        rank = environment.node_rank() * per_node + environment.local_rank()
    else:
        world, rank = environment.world_size(), environment.global_rank()
    apart = world > 1 and environment.creates_processes_externally and DECISION not in os.environ
    if apart:  # where the store is: torchrun's, SLURM's (the first node, a port from the job id), given
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = environment.main_address, str(environment.main_port)
    return Launch(rank=rank, world=world, apart=apart, environment=name)


def launch_folder(fresh: str) -> str:
    """A new run's folder under its model and data: inside a SLURM job ``slurm/<job id>`` (an array
    task has an id of its own), with ``.<step>`` for an ``srun`` step, so that every task of the step
    and every requeued attempt of the job (its steps numbered again from 0) name one folder, while a
    timestamp (``fresh``) would differ from task to task and attempt to attempt."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not job.isdigit():
        return fresh
    step = os.environ.get("SLURM_STEP_ID", "")
    return f"slurm/{job}.{step}" if step.isdigit() else f"slurm/{job}"


OmegaConf.register_new_resolver("genlab_launch_folder", launch_folder, replace=True)


def start_timeout() -> float:
    text = os.environ.get(TIMEOUT, "600")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{TIMEOUT}={text!r}: give the seconds to wait for the first process, e.g. 600") from None


def backend(trainer_cfg) -> str:
    """The process group's backend as Lightning's DDP would choose it: NCCL on CUDA, else gloo."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return "nccl" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "gloo"


def record(message: str) -> None:
    """Into the run's log files (rank 0's train.log): the console gets the message as an error line."""
    entry = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(entry)


class Ranks(L.Callback):
    """One run's processes: the decision shared from the first (``publish``) to the others
    (``receive``), and a failure of any of them shared with all (``with ranks:`` around the run;
    under Lightning's own processes from the fit's ``setup`` on)."""

    def __init__(self, trainer_cfg=None):
        self.trainer_cfg = trainer_cfg or {}
        self.launch = launch(trainer_cfg) if trainer_cfg is not None else Launch()  # None: a process alone
        self.published = False
        self.refused = False  # the start was a refusal, which every process has learnt already
        self.store: dist.Store | None = None
        self.prefix = f"genlab/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"  # torchrun's store outlives a restart
        self._recorded = False  # another's failure is in this one's log already
        self._watcher: threading.Thread | None = None
        self._ended = threading.Event()

    @property
    def first(self) -> bool:
        return self.launch.rank == 0

    # --- the store -------------------------------------------------------------------------------
    def _client(self, serve: bool = False) -> dist.Store:
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return dist.TCPStore(address, port, self.launch.world, is_master=serve,
                             timeout=timedelta(seconds=start_timeout()), wait_for_workers=False)

    def __enter__(self) -> "Ranks":
        if self.launch.apart:
            serve = self.first and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            try:
                self.store = self._client(serve)
            except (RuntimeError, ValueError) as err:  # DistStoreError, a port in use, an unknown host
                raise ConfigError(f"process {self.launch.rank} of {self.launch.world} cannot reach its launch's store "
                                  f"at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({err}); check "
                                  f"MASTER_ADDR/MASTER_PORT, or wait longer with {TIMEOUT}=<seconds>") from None
            self._watch()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._ended.set()
        if self._watcher is not None:  # not left inside a store call when the interpreter ends
            self._watcher.join()
        if self.store is None:
            return
        if self.refused:  # every process has the refusal, or will get it while the first's store stays
            if self.first:
                self._wait_for(self.prefix + "read")
            return
        try:
            if exc is None or isinstance(exc, SystemExit):
                self._leave()
                return
            # a launcher ends the others' processes once one ends (torchrun's agent, srun): this
            # one's message still comes first, its own ending is the one left
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            other = self.failure()
            if other is None or other["rank"] == self.launch.rank:
                other = self.fail(exc)
            if other is None:
                return
            # this one only followed another, or failed as it did (a non-finite gradient, averaged
            # over the processes, reaches every loss): the launch tells one story, the first failure's
            self.store.add(self.prefix + "seen", 1)
        except RuntimeError:  # the store went away with the first process: nothing to share
            return
        message = self.failure_message(other)
        if not self._recorded:
            record(message)
        raise GenlabError(message) from None

    def _leave(self) -> None:
        """A process that ends well says so; the first, which may serve the store, waits for the
        others, whose watchers would take a store that went away for a failure."""
        self.store.add(self.prefix + "ended", 1)
        if self.first:
            self._wait_for(self.prefix + "ended", also_self=True)

    def _wait_for(self, counter: str, also_self: bool = False) -> None:
        """The first process, which may serve the store, waits (at most ``LEAVE_S``) until every other
        process has counted itself in ``counter``: one that starts late still finds the store there."""
        others = self.launch.world - (0 if also_self else 1)
        deadline = time.monotonic() + LEAVE_S
        while (int(self.store.add(counter, 0)) < others and self.failure() is None
               and time.monotonic() < deadline):
            time.sleep(POLL_S)

    def setup(self, trainer, pl_module, stage):
        """Under Lightning's own processes: the process group (and its store, served by the first
        process at MASTER_ADDR:MASTER_PORT) exists from here on."""
        if self.store is None and trainer.world_size > 1 and dist.is_initialized() and "MASTER_PORT" in os.environ:
            self.store = self._client()
            self._watch()

    def on_exception(self, trainer, pl_module, exception):
        """What ended training, into train.log while it is open: this process's error, or, where a
        collective broke as another process ended, that one's."""
        from genlab.run.stopping import RunInterrupted

        try:
            other = self.failure()
        except RuntimeError:
            other = None
        if other is not None and other["rank"] != self.launch.rank:
            record(self.failure_message(other))
            self._recorded = True
        elif not isinstance(exception, (RunInterrupted, KeyboardInterrupt)):
            record(describe(exception))

    # --- the start -------------------------------------------------------------------------------
    def publish(self, start: Start) -> None:
        text = json.dumps(asdict(start))
        os.environ[DECISION] = text
        self.published, self.refused = True, start.error is not None
        if self.store is not None:
            self.store.set(self.prefix + "start", text)
            if start.error is None and start.done is None:
                self._join()

    def receive(self) -> Start:
        """The first process's decision (raised here if it was a refusal)."""
        text = os.environ.get(DECISION)
        if text is None:
            text = self._wait()
        start = Start(**json.loads(text))
        self.refused = start.error is not None
        start.raise_error()
        if self.store is not None and start.done is None:
            self._join()
        return start

    def _wait(self) -> str:
        if self.store is None:
            raise ConfigError("this process is not the first of its run, but neither Lightning, SLURM nor torchrun "
                              "started it (no SLURM_NTASKS, TORCHELASTIC_RUN_ID, or LOCAL_RANK with MASTER_PORT): "
                              "start it with one of them")
        try:
            text = self.store.get(self.prefix + "start").decode()
            self.store.add(self.prefix + "read", 1)  # the first, if it refused, waits for this
            return text
        except RuntimeError:  # DistStoreError: the time ran out, or the first process's store went away
            raise ConfigError(f"the first process of this run decided nothing within {start_timeout():g} s, or ended "
                              f"without a word: see its log; {TIMEOUT}=<seconds> waits longer") from None

    def _join(self) -> None:
        """The run goes ahead: the process group, on the launch's store, for Lightning to use."""
        if not dist.is_initialized():
            dist.init_process_group(backend(self.trainer_cfg), store=dist.PrefixStore(self.prefix + "pg", self.store),
                                    rank=self.launch.rank, world_size=self.launch.world, timeout=COLLECTIVE_TIMEOUT)

    def close(self, trained: bool) -> None:
        """The first process at the end of its run (the decision is not for a later run in it)."""
        os.environ.pop(DECISION, None)

    # --- a failure -------------------------------------------------------------------------------
    def failure(self, store: dist.Store | None = None) -> dict | None:
        """The first failure a process of this launch recorded, if any."""
        store = store or self.store
        if store is None or not store.check([self.prefix + "failed"]):
            return None
        return json.loads(store.get(self.prefix + "failed").decode())

    def failure_message(self, failure: dict) -> str:
        return f"process {failure['rank']} of {self.launch.world} failed, so this one stopped too: {failure['message']}"

    def fail(self, exc: BaseException) -> dict | None:
        """Tell the others, and give them the time to read it (the first process serves the store);
        where another process failed first, its failure is returned, for this one to follow."""
        from genlab.run.stopping import RunInterrupted

        message = f"stopped by {exc} on its own" if isinstance(exc, RunInterrupted) else describe(exc)
        record = json.dumps({"rank": self.launch.rank, "message": message})
        try:
            first = self.store.compare_set(self.prefix + "failed", "", record).decode()
            if first != record:
                return json.loads(first)
            deadline = time.monotonic() + ACK_S
            while int(self.store.add(self.prefix + "seen", 0)) < self.launch.world - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except RuntimeError:  # the store is gone with its process: the others noticed that
            pass
        return None

    def _watch(self) -> None:
        self._watcher = threading.Thread(target=self._watching, name="genlab-ranks", daemon=True)
        self._watcher.start()

    def _watching(self) -> None:
        try:
            store = self._client()
            while not self._ended.wait(POLL_S):
                failure = self.failure(store)
                if failure is not None and failure["rank"] != self.launch.rank:
                    break
            else:
                return
        except RuntimeError as err:  # the store's process ended without a word
            if not self._ended.is_set():
                self._end(f"the first process of this run ended without a word (its store went away: {err}); "
                          "see its log")
            return
        # said before the failing process hears it was seen: once that one ends, its launcher may
        # end this one (torchrun's agent sends SIGTERM) before it could say why
        self._end(self.failure_message(failure), seen=store)

    def _end(self, message: str, seen: dist.Store | None = None) -> None:
        """Say why, then end this process now: its main thread may wait in a collective that never
        completes."""
        print(f"error: {message}", file=sys.stderr, flush=True)
        record(message)
        if seen is not None:
            try:
                seen.add(self.prefix + "seen", 1)
            except RuntimeError:  # the failing process stopped waiting
                pass
        logging.shutdown()
        os._exit(1)
