"""Files a run writes: atomically (temporary file + rename), so a killed run never leaves a
truncated ``metrics.json``, ``samples.txt``, cache or checkpoint that a later step would trust.

A temporary file is created private (mode 0600); before the rename it gets the mode an ordinary
``open()`` would give (0666 less the umask), so other users and tools can read what a run wrote."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from genlab.errors import ConfigError, DiskFull


def default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_stream(path: str | Path, source: BinaryIO, size: int | None = None) -> None:
    """Copy a readable binary stream (a file, an HTTP response) to ``path`` atomically; ``size``,
    where known, is named if the disk fills."""
    atomic_write_chunks(path, iter(lambda: source.read(1 << 20), b""), size)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    view = memoryview(data)  # slices of it are not copies
    atomic_write_chunks(path, (view[i : i + (1 << 20)] for i in range(0, len(view), 1 << 20)), len(view))


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically: serialised in memory, then written."""
    data = io.BytesIO()
    torch.save(obj, data)
    atomic_write_bytes(path, data.getbuffer())


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes], size: int | None = None) -> None:
    """Write the bytes ``chunks`` yields to ``path`` atomically, holding one chunk at a time. A full
    disk raises ``DiskFull`` (``size``: the bytes the file needs, where known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, prefix=f".{path.name}.") as tmp:
        try:
            for chunk in chunks:
                written += tmp.write(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.fchmod(tmp.fileno(), default_file_mode())
        except BaseException as err:
            os.unlink(tmp.name)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, err, size, written) from None
            raise
    try:
        os.replace(tmp.name, path)
    except BaseException:  # e.g. the target is a folder: leave no temporary file behind
        os.unlink(tmp.name)
        raise


def disk_full(path: Path, err: OSError, size: int | None, written: int) -> DiskFull:
    free = shutil.disk_usage(path.parent).free
    kept = f"the previous {path.name} is whole" if path.exists() else f"no earlier {path.name} was there"
    needs = f"needs {bytes_text(size)} free" if size else f"stopped after {bytes_text(written)}"
    return DiskFull(f"the disk holding {path.parent} is full ({err.strerror}): writing {path.name} {needs}, "
                    f"and {bytes_text(free)} are free; {kept}.")


def bytes_text(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_metrics(path: str | Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def open_no_follow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link at ``path``: a run folder someone else made may hold
    one pointing anywhere (a lock file opened through it would truncate its target)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link, and genlab writes no file of a run folder through one "
                              f"(it could point anywhere); remove it (rm {path}) or run in another folder") from None
        raise


class NoFollowFileHandler(logging.FileHandler):
    """A log file (train.log) appended to only if it is not a symbolic link (``open_no_follow``)."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=lambda path, flags: open_no_follow(path, flags, 0o666))


def check_writable_folder(folder: str | Path, error: type[Exception], fix: str) -> Path:
    """Create ``folder`` if needed and make sure files can be written in it; otherwise raise
    ``error`` naming the folder, why, and ``fix`` (the setting to change)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise error(f"cannot write into {folder} ({err.strerror or err}); make it writable, or {fix}") from None
    return folder


def save_result(write: Callable[[Path], None], path: Path, what: str, chosen: bool) -> bool:
    """``write(path)`` for a command that has already shown its result (eval.py, sample.py). A run
    folder shared read-only costs one line saying what was not saved, where; a file the user
    chose (``chosen``: out=) that cannot be written is an error."""
    try:
        write(path)
        return True
    except OSError as err:
        reason = err.strerror or str(err)
        if chosen:
            raise ConfigError(f"cannot write out={path} ({reason}); give a file in a folder you can write") from None
        print(f"{what} not saved: {path} cannot be written ({reason}); pass out=FILE to save it elsewhere",
              file=sys.stderr)
        return False
