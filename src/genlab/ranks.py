"""The first process of a run decides how the run starts (new, resumed from which checkpoint, a
finished job kept as it is, or refused) and every other process learns that decision before it
builds anything. When the first refuses, all stop at once with its message; none waits in the
process group for a process that left.

- Processes that Lightning starts (``trainer=ddp`` on one machine) begin inside the first one's
  ``fit``, after the decision: they inherit it in the environment.
- Processes started apart (SLURM's tasks, torchrun, one command per node) begin together: the first
  writes the decision to ``outputs/.ranks/<launch>/decision.json`` (under the project folder, which
  they share: on several nodes a shared file system, as SLURM jobs need anyway) and the others wait
  for it there. The last process to read it removes the folder, so nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from genlab import errors
from genlab.errors import ConfigError, GenlabError
from genlab.outputs import atomic_write_text

DECISION = "GENLAB_START"  # the decision, for the processes Lightning starts
TIMEOUT = "GENLAB_START_TIMEOUT"  # seconds the other processes wait for the first's decision
POLL_S = 0.1


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


def refusal(err: BaseException) -> Start:
    message = str(err) if isinstance(err, GenlabError) else f"the first process stopped: {type(err).__name__}: {err}"
    return Start(error=message, error_type=type(err).__name__)


def launch_key() -> str | None:
    """For processes started apart, what the processes of one launch share and no other launch
    does: SLURM's job, step and restart; torchrun's run id and restart; else (one command per node,
    LOCAL_RANK given) the address of the process group. None where Lightning starts the others."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS") or 1) > 1:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 0)}-{env.get('SLURM_RESTART_COUNT', 0)}"
    if "TORCHELASTIC_RUN_ID" in env:
        return (f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', 0)}-"
                f"{env.get('MASTER_PORT', '')}")
    if "LOCAL_RANK" in env and "MASTER_PORT" in env:
        return f"{env.get('MASTER_ADDR', 'localhost')}-{env['MASTER_PORT']}"
    return None


def world_size(trainer_cfg) -> int:
    """How many processes the launch has (0: not known)."""
    for name in ("SLURM_NTASKS", "WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    nodes, devices = trainer_cfg.get("num_nodes", 1), trainer_cfg.get("devices", 1)
    return nodes * devices if isinstance(nodes, int) and isinstance(devices, int) and devices > 0 else 0


class Ranks:
    """One run's decision, shared from the first process (``publish``) to the others (``receive``)."""

    def __init__(self, root: Path, processes: int):
        key = launch_key()
        self.folder = Path(root) / "outputs" / ".ranks" / key if key else None
        self.processes = processes
        self.published = False

    def publish(self, start: Start) -> None:
        text = json.dumps(asdict(start))
        os.environ[DECISION] = text
        self.published = True
        if self.folder is not None and self.processes != 1:
            atomic_write_text(self.folder / "decision.json", text)

    def receive(self) -> Start:
        """The first process's decision (raised here if it was a refusal)."""
        text = os.environ.get(DECISION)
        if text is None:
            text = self._wait()
        start = Start(**json.loads(text))
        start.raise_error()
        return start

    def _wait(self) -> str:
        if self.folder is None:
            raise ConfigError("this process is not the first of its run, but neither Lightning, SLURM nor torchrun "
                              "started it (no SLURM_JOB_ID, TORCHELASTIC_RUN_ID, or LOCAL_RANK with MASTER_PORT): "
                              "start it with one of them")
        timeout = float(os.environ.get(TIMEOUT, 600))
        deadline = time.monotonic() + timeout
        decision = self.folder / "decision.json"
        while not decision.exists():
            if time.monotonic() > deadline:
                raise ConfigError(f"the first process of this run decided nothing within {timeout:g} s "
                                  f"({decision} did not appear): see its log; {TIMEOUT}=<seconds> waits longer")
            time.sleep(POLL_S)
        text = decision.read_text()
        (self.folder / f"read-{socket.gethostname()}-{os.getpid()}").touch()
        if self.processes and len(list(self.folder.glob("read-*"))) >= self.processes - 1:
            self._remove()  # every other process has it: the last one clears
        return text

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for empty in (self.folder.parent, self.folder.parent.parent):  # outputs/.ranks, outputs: if nothing else
            try:
                empty.rmdir()
            except OSError:
                break

    def close(self, trained: bool) -> None:
        """The first process at the end: once the run trained, every process has read the decision."""
        os.environ.pop(DECISION, None)
        if trained and self.folder is not None:
            self._remove()
