"""Obtain a data file: the local cache, else a local mirror, else its public URL, with sha256 checks.

A mirror is a folder laid out like ``../shared/data`` (``names/nomi_italiani.raw.txt``, ...). It is
named by the ``paths.data_mirror`` setting, which defaults to the ``GENLAB_DATA_MIRROR`` environment
variable (the Makefile and ``.ci/run`` point it at ``../shared/data`` when that folder exists).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from genlab.errors import DataError
from genlab.run.outputs import atomic_write_stream, check_writable_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it comes from and how to recognise it."""

    name: str  # path relative to the cache and to the mirror, e.g. "names/nomi_italiani.raw.txt"
    url: str
    sha256: str | None  # of the canonical download; None where it cannot be pinned
    mirror_sha256: str | None = None  # of the mirror's copy, where its bytes differ from the URL's

    @property
    def expected_mirror_sha256(self) -> str | None:
        return self.mirror_sha256 or self.sha256


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dst: Path, timeout: float = 30.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        atomic_write_stream(dst, response)


def fetch(remote: RemoteFile, cache_dir: str | Path, mirror: str | Path | None = None) -> Path:
    """Return the path of a verified local copy of ``remote`` under ``cache_dir``.

    A cached copy whose checksum does not match is set aside (renamed ``*.corrupt``) and fetched
    again, so nothing the user had is deleted silently.
    """
    target = Path(cache_dir) / remote.name
    accepted = {h for h in (remote.sha256, remote.mirror_sha256) if h}
    if target.exists():
        if not accepted or sha256_of(target) in accepted:
            return target
        corrupt = target.with_name(target.name + ".corrupt")
        log.warning("%s: checksum mismatch, moved to %s and fetching again", target, corrupt)
        os.replace(target, corrupt)

    check_writable_folder(target.parent, DataError, "set paths.data_dir to a folder you can write")
    tried = []
    if mirror:
        source = Path(mirror) / remote.name
        if source.exists():
            expected = remote.expected_mirror_sha256
            if expected and sha256_of(source) != expected:
                raise DataError(
                    f"the mirror file {source} does not match its checksum (expected sha256 {expected}); "
                    "the mirror is damaged: restore it, or unset paths.data_mirror to download from "
                    f"{remote.url}"
                )
            with open(source, "rb") as f:
                atomic_write_stream(target, f)
            log.info("copied %s from the mirror %s", remote.name, mirror)
            return target
        tried.append(f"mirror: {source} (not there)")
    else:
        tried.append("mirror: none set (paths.data_mirror / GENLAB_DATA_MIRROR)")

    try:
        _download(remote.url, target)
    except Exception as err:  # no network, HTTP error, ...
        tried.append(f"download: {remote.url} ({err.__class__.__name__}: {err})")
        raise DataError(
            f"cannot obtain {remote.name}.\n  tried " + "\n  tried ".join(tried) + "\n"
            f"Fix: connect to the internet, or point paths.data_mirror=/path/to/mirror (or the "
            f"GENLAB_DATA_MIRROR environment variable) at a folder holding {remote.name}, "
            f"or copy the file to {target} yourself."
        ) from None
    if remote.sha256 and (got := sha256_of(target)) != remote.sha256:
        corrupt = target.with_name(target.name + ".corrupt")
        os.replace(target, corrupt)
        raise DataError(
            f"{remote.url} gave a file with sha256 {got}, expected {remote.sha256}; kept it as "
            f"{corrupt}. The source may have changed: check it, or use a mirror (paths.data_mirror)."
        )
    log.info("downloaded %s", remote.url)
    return target
