"""Files a run writes: atomically (temporary file + rename), so a killed run never leaves a
truncated ``metrics.json``, ``samples.txt``, cache or checkpoint that a later step would trust.

A temporary file is created private (mode 0600); before the rename it gets the mode an ordinary
``open()`` would give (0666 less the umask), so other users and tools can read what a run wrote."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable


def default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_stream(path: str | Path, source: BinaryIO) -> None:
    """Copy a readable binary stream (a file, an HTTP response) to ``path`` atomically."""
    atomic_write_chunks(path, iter(lambda: source.read(1 << 20), b""))


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write the bytes ``chunks`` yields to ``path`` atomically, holding one chunk at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, prefix=f".{path.name}.") as tmp:
        try:
            for chunk in chunks:
                tmp.write(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.fchmod(tmp.fileno(), default_file_mode())
        except BaseException:
            os.unlink(tmp.name)
            raise
    try:
        os.replace(tmp.name, path)
    except BaseException:  # e.g. the target is a folder: leave no temporary file behind
        os.unlink(tmp.name)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_stream(path, io.BytesIO(text.encode("utf-8")))


def write_metrics(path: str | Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")


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
