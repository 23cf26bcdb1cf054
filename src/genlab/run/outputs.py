"""Files a run writes: atomically (temporary file + rename, then the folder synced), so a killed run
never leaves a truncated ``metrics.json``, ``samples.txt``, cache or checkpoint that a later step
would trust.

A temporary file is named ``.<name>.<8 hex digits>.tmp`` beside its target, so that what a killed
save left (SIGKILL, out of memory, SLURM's time limit) is known as such: the next start of that run
removes it (``remove_temporaries``). It is created as ``open()`` creates a file (0666 less the
umask, applied by the system), so other users and tools can read what a run wrote. A full disk at
any point of a write, the temporary file's creation included, is one ``DiskFull``."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from genlab.errors import ConfigError, DiskFull

TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_stream(path: str | Path, source: BinaryIO, size: int | None = None) -> None:
    """Copy a readable binary stream (a file, an HTTP response) to ``path`` atomically; ``size``,
    where known, is named if the disk fills."""
    atomic_write_chunks(path, iter(lambda: source.read(1 << 20), b""), size)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    view = memoryview(data)  # slices of it are not copies
    atomic_write_chunks(path, (view[i : i + (1 << 20)] for i in range(0, len(view), 1 << 20)), len(view))


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically: streamed into the temporary file record by
    record (never the whole checkpoint in memory)."""
    atomic_write(path, lambda f: torch.save(obj, f), size=lambda: saved_size(obj))


class _Sink:
    """Counts the bytes written to it, and keeps none."""

    def __init__(self):
        self.written = 0

    def write(self, data) -> int:
        self.written += len(memoryview(data).cast("B"))
        return self.written

    def flush(self) -> None:
        pass


def saved_size(obj) -> int:
    """The bytes ``torch.save(obj)`` writes, found by saving into nothing (for a full disk's message:
    a streamed save does not know its size before it ends)."""
    sink = _Sink()
    torch.save(obj, sink)
    return sink.written


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes], size: int | None = None) -> None:
    """Write the bytes ``chunks`` yields to ``path`` atomically, holding one chunk at a time. A full
    disk raises ``DiskFull`` (``size``: the bytes the file needs, where known)."""

    def write(f) -> None:
        for chunk in chunks:
            f.write(chunk)

    atomic_write(path, write, size)


class _Counted:
    """The temporary file as the writer sees it: counts what was written, and keeps the error a
    write met (torch's writer reports it as its own RuntimeError)."""

    def __init__(self, file):
        self.file, self.written, self.error = file, 0, None

    def write(self, data) -> int:
        try:
            n = self.file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: str | Path, write, size=None) -> None:
    """``write(f)`` into a temporary file beside ``path``, synced, renamed over ``path``, then the
    folder synced (the rename itself survives a crash). ``size``: the bytes the file needs, or a
    function that finds them (asked only if the disk fills), for the ``DiskFull`` message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, out = None, None
    try:
        tmp, fd = create_temporary(path)
        with os.fdopen(fd, "wb") as f:
            out = _Counted(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        sync_folder(path.parent)
    except BaseException as err:
        if tmp is not None:  # e.g. the target is a folder, or the disk filled: no temporary file left
            Path(tmp).unlink(missing_ok=True)
        cause = out.error if out is not None and out.error is not None else err
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            needed = size() if callable(size) else size
            raise disk_full(path, cause, needed, out.written if out is not None else 0) from None
        raise


def create_temporary(path: Path) -> tuple[str, int]:
    while True:
        name = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return str(name), os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writes left under ``folder`` (call it only while no
    other process writes there: the run folder's lock held); returns them."""
    found = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and TEMPORARY.match(p.name)]
    for p in found:
        p.unlink(missing_ok=True)
    return found


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
