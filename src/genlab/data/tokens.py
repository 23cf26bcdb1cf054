"""Token files: a text source streamed from disk in chunks, tokenised over the cores, written as a
flat array of the smallest unsigned integer type the vocabulary fits (``uint16``, or ``uint32``
above 65,536 symbols), and read back as a memory map. Memory stays a few chunks whatever the size.

Chunks end where the tokenizer would split the text anyway (GPT-2 BPE: before a single space or
newline between two printable ASCII characters), so the tokens are those of the whole text."""

from __future__ import annotations

import codecs
import logging
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from genlab.errors import DataError
from genlab.run.outputs import atomic_write_chunks

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 1 MiB of text per task: far more than a call costs, little memory in flight
END_OF_DOCUMENT = None  # what ``pieces`` yields between two files of a folder
_BPE_CUT = re.compile(rb"[!-~][ \n][!-~]")  # x, one space or newline, y: GPT-2's regex splits before it
UNICODE_SIZE = 0x110000


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _char_cut(data: bytes) -> int:
    """The last position that starts a UTF-8 character and does not split a \\r\\n."""
    i = len(data) - 1
    while i > 0 and ((data[i] & 0xC0) == 0x80 or data[i - 1 : i + 1] == b"\r\n"):
        i -= 1
    return i


def _bpe_cut(data: bytes) -> int:
    tail = max(0, len(data) - (1 << 16))
    last = None
    for last in _BPE_CUT.finditer(data, tail):
        pass
    # a text without one such place in 64 KiB (no spaces: CJK): cut between characters; the
    # tokens at that one place may then differ from the whole text's
    return last.start() + 1 if last else _char_cut(data)


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it, e.g. iconv -f latin1 -t utf-8.") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text  # as open() reads it


def read_chunks(path: Path, cut: Callable[[bytes], int]) -> Iterator[tuple[str, int]]:
    """(text, bytes read) of about ``CHUNK_BYTES`` at a time; a byte-order mark is not text."""
    with open(path, "rb") as f:
        carry = f.read(len(codecs.BOM_UTF8))
        carry = carry.removeprefix(codecs.BOM_UTF8)
        while True:
            block = f.read(CHUNK_BYTES)
            data = carry + block
            if not block:
                if data:
                    yield _decode(data, path), len(data)
                return
            at = cut(data)
            carry = data[at:]
            yield _decode(data[:at], path), at


def text_files(path: Path) -> list[Path]:
    """A file, or a folder's ``.txt`` files in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise DataError(f"data.path={path} is a folder without .txt files; give a text file or a folder of them.")
        return files
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file or folder; give a UTF-8 text file or a folder of .txt files.")
    return [path]


class Source:
    """The text a token file is made from: files read in chunks, or one text already in memory
    (a named source after its normalisation). Between two files comes ``END_OF_DOCUMENT``."""

    def __init__(self, files: list[Path] | None = None, text: str | None = None):
        self.files, self.text = files or [], text

    @property
    def size(self) -> int:
        """Bytes to read (for the progress line)."""
        return len(self.text.encode()) if self.text is not None else sum(f.stat().st_size for f in self.files)

    def pieces(self, cut: Callable[[bytes], int]) -> Iterator[tuple[str | None, int]]:
        if self.text is not None:
            data, start = self.text.encode(), 0
            while start < len(data):  # the same chunks as a file's
                end = start + CHUNK_BYTES
                end = len(data) if end >= len(data) else start + cut(data[start:end])
                yield data[start:end].decode(), end - start
                start = end
            return
        for i, path in enumerate(self.files):
            if i:
                yield END_OF_DOCUMENT, 0
            yield from read_chunks(path, cut)


def _in_parallel(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(function, items)`` over ``workers`` threads, in order, with a few items in flight
    (``Executor.map`` would read the whole source first). The tokenizers' inner loops (tiktoken's
    Rust, numpy's indexing) release the GIL."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Progress:
    """One log line every few seconds while a large source is tokenised."""

    def __init__(self, name: str, total: int, every: float = 5.0):
        self.name, self.total, self.every = name, total, every
        self.done, self.start = 0, time.perf_counter()
        self.shown = self.start

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.shown >= self.every:
            self.shown = now
            log.info("%s: tokenised %s of %s MB (%d%%), %.1f MB/s", self.name, f"{self.done / 1e6:,.0f}",
                     f"{self.total / 1e6:,.0f}", 100 * self.done // max(1, self.total),
                     self.done / 1e6 / (now - self.start))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


CHAR_SEPARATOR = "\n\n"  # between two files of a folder: a blank line


def characters_of(source: Source, progress: Progress | None = None) -> str:
    """Every character the source uses, in code-point order (the character vocabulary)."""
    seen = np.zeros(UNICODE_SIZE, dtype=bool)

    def mark(piece):
        text, size = piece
        if text is not None:
            seen[_code_points(text)] = True
        return size

    for size in _in_parallel(mark, source.pieces(_char_cut), workers()):
        if progress:
            progress.add(size)
    if len(source.files) > 1:
        seen[_code_points(CHAR_SEPARATOR)] = True
    return "".join(map(chr, np.flatnonzero(seen)))


def write_char_tokens(source: Source, chars: str, path: Path, progress: Progress) -> int:
    """Write the source's characters as ids into ``chars``; returns the token count."""
    dtype = dtype_for(len(chars))
    lookup = np.zeros(UNICODE_SIZE, dtype=dtype)
    lookup[_code_points(chars)] = np.arange(len(chars), dtype=dtype)

    def encode(piece):
        text, size = piece
        return lookup[_code_points(CHAR_SEPARATOR if text is None else text)], size

    return _write(_in_parallel(encode, source.pieces(_char_cut), workers()), path, progress)


def write_bpe_tokens(source: Source, encoding, end_of_text: int, path: Path, progress: Progress) -> int:
    """Write the source's GPT-2 tokens (tiktoken), the end-of-text token between files."""
    dtype = dtype_for(encoding.n_vocab)

    def encode(piece):
        text, size = piece
        if text is None:
            return np.array([end_of_text], dtype=dtype), size
        return encoding.encode_to_numpy(text, disallowed_special=()).astype(dtype), size  # = encode_ordinary

    return _write(_in_parallel(encode, source.pieces(_bpe_cut), workers()), path, progress)


def _write(encoded: Iterator[tuple[np.ndarray, int]], path: Path, progress: Progress) -> int:
    count = 0

    def chunks():
        nonlocal count
        for ids, size in encoded:
            count += len(ids)
            progress.add(size)
            yield ids.tobytes()

    atomic_write_chunks(path, chunks())
    return count
