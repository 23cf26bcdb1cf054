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
import logging
import logging.handlers
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genlab.errors import CheckpointError, ConfigError
from genlab.outputs import atomic_write_text, check_writable_folder
from genlab.runtime import hydra_config, task_overrides

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


def flatten(node: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys: {"model": {"n_embd": 10}} -> {"model.n_embd": 10}."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


class RunFolder:
    """The folder of one run, held by this process from ``open`` to ``close``.

    ``open`` takes the folder's lock and refuses a folder that another process is writing or that
    holds another run; it writes nothing but the lock file, which ``close`` removes. ``claim``
    records the run (``.hydra/``, ``train.log``) once it is known to be valid there. Only the
    first process of a distributed run does any of this (the others write into the same folder)."""

    def __init__(self, path: Path, primary: bool = True):
        self.path, self.primary = Path(path), primary
        self.claimed = False
        self._lock_fd: int | None = None
        self._early_log: logging.handlers.MemoryHandler | None = None
        self._file_log: logging.Handler | None = None

    def open(self, resuming_here: bool, overwrite: bool) -> "RunFolder":
        if not self.primary:
            return self
        if self.path.is_file():
            raise ConfigError(f"the run folder {self.path} is a file; choose another folder (hydra.run.dir=...)")
        check_writable_folder(self.path, ConfigError, "choose another folder with hydra.run.dir=...")
        self._lock()
        if holds_run(self.path) and not resuming_here and not overwrite:
            self.close()
            raise ConfigError(
                f"{self.path} already holds a run, and a folder holds one run. Continue that run with "
                f"ckpt_path={self.path}, start this one in a new folder (leave hydra.run.dir unset or give "
                "another), or replace the old run with overwrite=true")
        # what is logged before the claim goes to train.log only if the run goes ahead
        self._early_log = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        logging.getLogger().addHandler(self._early_log)
        return self

    def _lock(self) -> None:
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
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

    def claim(self, cfg: DictConfig, overwrite: bool) -> None:
        """The run is valid here: clear what it replaces, record its config, start its log file."""
        if not self.primary:
            return
        if overwrite:
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        # a resumed run's final figures are written again when it ends: until then it has none, so
        # that nothing (compare.py, a sweep's summary) takes the old ones for the new run's
        (self.path / "metrics.json").unlink(missing_ok=True)
        record = self.path / ".hydra"
        atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(task_overrides())))
        if (hydra := hydra_config()) is not None:
            atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})))
        self._file_log = logging.FileHandler(self.path / "train.log", encoding="utf-8")
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
        return self

    def __exit__(self, *exc) -> None:
        self.close()
