"""Where a run writes, which checkpoint a resumed run continues from, and who owns a run folder.

``ckpt_path`` may be a checkpoint file, a run folder, or ``last`` (the newest run of the same
model and data). A resumed run writes into the folder of the run it continues, so its
TensorBoard curves, checkpoints and ``metrics.json`` stay together. Hydra picks the run folder
before any code runs, so ``conf/hydra/default.yaml`` asks the ``genlab_run_dir`` resolver.

A run folder belongs to one run (``RunFolder``): a process locks it for as long as it runs, a new
run is refused in a folder that holds another one (unless ``overwrite=true``), and nothing is
written into it before the run is known to be valid there (``claim``), so a refused command
changes nothing on disk. Hydra's own ``.hydra/`` record and log file are therefore written by
``claim``, not by Hydra (``conf/hydra/default.yaml`` turns Hydra's off)."""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import shutil
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

from genlab.errors import CheckpointError, ConfigError, FolderTaken
from genlab.run.outputs import NoFollowFileHandler, atomic_write_text, check_writable_folder, open_no_follow, remove_temporaries
from genlab.run.plan import PLAN_FILE, Plan
from genlab.run.ranks import Ranks, Start, describe, refusal
from genlab.run.runtime import choice, hydra_config, in_sweep, task_overrides
from genlab.run.trust import read_json

RUNS = Path("outputs/runs")
# what a run writes into its folder: a folder holding any of the first five holds a run, and
# overwrite=true removes these (and nothing else a user may have put there)
RUN_MARKERS = ("checkpoints", "metrics.json", "tensorboard", "csv", ".hydra")
RUN_FILES = (*RUN_MARKERS, "insight", "grids", "samples.txt", "train.log", "lr_find.png", "real_images.png",
             "progress.gif", "losses.png", "samples.png", "interpolation.png", "eval.json", "fit-profile.txt",
             "test-profile.txt")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # train.log's lines


def checkpoint_file(ckpt_path: str, model: str = "?", data: str = "?") -> Path:
    """The checkpoint a ``ckpt_path`` setting names. ``last``: the newest run of this model and
    data (of any model and data where they are not known, as in sample.py)."""
    if ckpt_path == "last":
        runs = f"{model}-{data}" if "?" not in (model, data) else "*"
        candidates = sorted(RUNS.glob(f"{runs}/*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            which = f"of model={model} data={data} " if runs != "*" else ""
            raise CheckpointError(f"ckpt_path=last: no earlier run {which}under {RUNS}/ (with a checkpoints/last.ckpt)")
        return candidates[-1]
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no checkpoint at {path}; give a .ckpt file, a run folder or last")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """<run>/checkpoints/<name>.ckpt -> <run>."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resolve_run_dir(ckpt_path, model: str, data: str, fresh: str) -> str:
    """The run folder: the resumed run's own, or ``fresh`` for a new run."""
    if ckpt_path in (None, "", "None", "null"):
        return fresh
    try:
        return str(run_dir_of(checkpoint_file(str(ckpt_path), model, data)))
    except CheckpointError:
        return fresh  # train() reports the problem with the full message


OmegaConf.register_new_resolver("genlab_run_dir", resolve_run_dir, replace=True)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def held(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (``RunFolder``: from ``open`` to ``close``). A
    killed process's lock file stays behind, its lock goes with the process. The probe takes a shared
    lock for a moment, so a process locking the folder at that very moment would be told to wait."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (or a link, which no run made): nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # which also releases the probe's lock
    return False


def slurm_job() -> dict | None:
    """The SLURM job this process belongs to: its id, and how often it was requeued."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``folder``: ``checkpoints/last.ckpt`` (genlab's,
    at a Lightning step boundary) or ``hpc_ckpt_*.ckpt`` (Lightning's SLURM requeue). A checkpoint is
    a zip archive whose directory is written last, so a cut-short one does not open."""
    candidates = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
    for path in sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            with zipfile.ZipFile(path):
                return path
        except (OSError, zipfile.BadZipFile):
            continue
    return None


class RunFolder:
    """The folder of one run, held by this process from ``open`` to ``close``.

    ``open`` takes the folder's lock and decides, on the run's plan (``genlab.run.plan``), how the run
    starts there (``Start``): a new run in a free folder; a continuation of the run an explicit
    ``ckpt_path`` names (recorded as such); and where the command is run again (a sweep's job, a
    requeued SLURM job) with the same plan: keep the run if it finished, resume it from its newest
    checkpoint, or start it again. Anything else in a folder holding a run is refused (unless
    ``overwrite=true``), naming the settings that differ. A refusal writes nothing but the lock file,
    which ``close`` removes. ``claim`` records the run (``.hydra/``, ``plan.json`` once, ``train.log``)
    once it is known to be valid there; until then the process does not own the folder, and a failure
    is reported beside it (``genlab.sweeps``). The first process of a distributed run decides; the
    others learn its decision (``genlab.run.ranks``) and write nothing."""

    def __init__(self, path: Path, primary: bool = True, ranks: Ranks | None = None):
        self.path, self.primary = Path(path), primary
        self.ranks = ranks or Ranks()
        self.start: Start | None = None
        self.recorded: dict | None = None  # the plan the folder holds, if any
        self.rerun = False  # this command run again over its own run (same plan)
        self.claimed = False
        self._lock_fd: int | None = None
        self._early_log: logging.handlers.MemoryHandler | None = None
        self._file_log: logging.Handler | None = None

    def open(self, plan: Plan) -> Start:
        if not self.primary:
            self.start = self.ranks.receive()
            return self.start
        cfg = plan.cfg
        ckpt_path = checkpoint_file(str(cfg.ckpt_path), choice("model"), choice("data")) if cfg.get("ckpt_path") else None
        resuming_here = ckpt_path is not None and run_dir_of(ckpt_path).resolve() == self.path.resolve()
        if self.path.is_file():
            raise ConfigError(f"the run folder {self.path} is a file; choose another folder (hydra.run.dir=...)")
        check_writable_folder(self.path, ConfigError, "choose another folder with hydra.run.dir=...")
        self._lock()
        self.recorded = read_json(self.path / PLAN_FILE)
        start = Start(ckpt_path=str(ckpt_path) if ckpt_path else None, overwrite=bool(cfg.overwrite))
        if holds_run(self.path) and not resuming_here and not cfg.overwrite:
            differences = plan.differences(self.recorded)
            if differences or not self.run_again():
                self.close()
                raise FolderTaken(self.taken(differences))
            self.rerun = True
            start = self.continue_job()
        self.start = start
        if start.done is not None:  # nothing to run: the others learn it now
            self.ranks.publish(start)
            return start
        return start

    def run_again(self) -> bool:
        """Whether this command may meet its own run here (a sweep's job, or the same SLURM job
        requeued); ``open`` then also requires the same plan."""
        job, recorded = slurm_job(), read_json(self.path / ".hydra" / "slurm.json")
        return in_sweep() or (job is not None and recorded is not None and recorded.get("job_id") == job["job_id"])

    def taken(self, differences: list[str]) -> str:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        what = f"a run of another plan ({shown})" if differences else "a run"
        if in_sweep():
            return (f"{self.path} holds {what}, and a folder holds one run. Run this sweep in a new folder (leave "
                    "hydra.sweep.dir unset or give another), or replace its runs with overwrite=true")
        return (f"{self.path} already holds {what}, and a folder holds one run. Continue that run with "
                f"ckpt_path={self.path}, start this one in a new folder (leave hydra.run.dir unset or give "
                "another), or replace the old run with overwrite=true")

    def continue_job(self) -> Start:
        """This command's own run: kept if it ended (a result: completed, or diverged), else resumed
        from its newest checkpoint, else (stopped or failed before its first) started again."""
        metrics = read_json(self.path / "metrics.json")
        if metrics is not None and metrics.get("status") not in (None, "failed"):
            return Start(done=metrics)
        checkpoint = newest_checkpoint(self.path)
        if checkpoint is not None:
            return Start(ckpt_path=str(checkpoint))
        return Start(overwrite=True)

    def _lock(self) -> None:
        lock = self.path / ".lock"
        fd = open_no_follow(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another process (pid {holder}) is writing {self.path} right now; wait for it to "
                              "end, or start this run in another folder (hydra.run.dir=...)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def claim(self, plan: Plan) -> None:
        """The run is valid here: the other processes learn it; clear what it replaces and what killed
        saves left, record its plan and config (once: a run resumed under its own plan keeps its
        record; an explicit ``ckpt_path`` continuation records its own, saying what it continues),
        start its log file."""
        if not self.primary:
            return
        self.ranks.publish(self.start)
        if self.start.overwrite:
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        remove_temporaries(self.path)  # of saves killed mid-write (this process holds the lock)
        # a resumed run's final figures are written again when it ends: until then it has none, so
        # that nothing (compare.py, a sweep's summary) takes the old ones for the new run's
        (self.path / "metrics.json").unlink(missing_ok=True)
        record = self.path / ".hydra"
        if not (self.rerun and self.recorded is not None and not self.start.overwrite):
            atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(plan.cfg))
            atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(task_overrides())))
            if (hydra := hydra_config()) is not None:
                atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})))
            atomic_write_text(self.path / PLAN_FILE, json.dumps(plan.record(), indent=2, sort_keys=True, default=str) + "\n")
        if (job := slurm_job()) is not None:  # a requeued job finds its run by this
            atomic_write_text(record / "slurm.json", json.dumps(job) + "\n")
        self._file_log = NoFollowFileHandler(self.path / "train.log", encoding="utf-8")
        self._file_log.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self._file_log)
        if self._early_log is not None:  # what was logged before the claim, then the buffer goes
            self._early_log.setTarget(self._file_log)
            self._early_log.flush()
            logging.getLogger().removeHandler(self._early_log)
            self._early_log.close()
            self._early_log = None
        self.claimed = True

    def close(self) -> None:
        self.ranks.close(trained=self.claimed)
        root = logging.getLogger()
        for handler in (self._early_log, self._file_log):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
        self._early_log = self._file_log = None
        if self._lock_fd is not None:
            (self.path / ".lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
            if not self.claimed and not any(self.path.iterdir()):
                self.path.rmdir()  # a refused run leaves no empty folder behind

    def __enter__(self) -> "RunFolder":
        if self.primary:  # what is logged before the claim (the plan, the data) goes to train.log if the run goes ahead
            self._early_log = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
            logging.getLogger().addHandler(self._early_log)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            exc.genlab_owned_folder = self.claimed  # where a sweep records it (genlab.sweeps)
        if self.primary and exc is not None and not self.ranks.published:
            self.ranks.publish(refusal(exc))  # refused before the claim: every process stops with this
        elif not self.primary and exc is not None and not isinstance(exc, SystemExit) and self.ranks.store is None:
            self.record_early_failure(exc)
        self.close()

    def record_early_failure(self, exc: BaseException) -> None:
        """A process Lightning started that fails before its trainer sets up has no store to tell the
        first process (``genlab.run.ranks``), which waits in the process group's set-up until Lightning's
        launcher ends it: the message goes into the run's train.log (appended to, never created)."""
        if not (self.path / "train.log").is_file():
            return  # the first process has not claimed the folder: it refused, and every process knows
        launch = self.ranks.launch
        message = f"process {launch.rank} of {launch.world} failed before its trainer set up: {describe(exc)}"
        try:
            handler = NoFollowFileHandler(self.path / "train.log", encoding="utf-8")
        except (OSError, ConfigError):  # gone, or a link: the console has the message all the same
            return
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.handle(logging.getLogger("genlab").makeRecord("genlab", logging.ERROR, __file__, 0, message, None, None))
        handler.close()


def owned_folder(err: BaseException) -> bool:
    """Whether the run folder was this process's when ``err`` ended the run."""
    return bool(getattr(err, "genlab_owned_folder", False))
