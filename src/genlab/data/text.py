"""Running text (``data=divina``, ``data=shakespeare``, or any UTF-8 file through ``data.path``),
as characters or GPT-2 BPE tokens.

The tokenised corpus is cached in ``<data_dir>/tokens/`` as a ``uint16`` file plus a JSON with the
vocabulary, so a second run starts at once. An entry is named by a hash of what it was made from
(the source file's bytes, its normalisation and the tokenizer), so no two sources share one. The split is by position: the
first 90% trains, the rest validates (``test_fraction`` > 0 carves a test split off the end).
Training batches are random windows of ``seq_len + 1`` tokens (``sampling=sequential``: the
text in order, for recurrent models that carry their state); validation reads the whole
validation split in consecutive windows, so its loss is exact and the same every time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch

from genlab.data.batches import FixedBatches, StreamBatches, WindowBatches, overfitting, replica, resume_position
from genlab.data.fetch import RemoteFile, fetch, sha256_of
from genlab.data.tokenizer import CharTokenizer, GPT2Tokenizer
from genlab.errors import ConfigError, DataError
from genlab.outputs import atomic_write_stream, atomic_write_text, check_writable_folder

log = logging.getLogger(__name__)

# Project Gutenberg eBook #1012. PG's file changes with its boilerplate, so the download is not
# pinned by checksum; the mirror's copy (PG's text without the boilerplate) is.
DIVINA = RemoteFile(
    name="divina/divina_commedia.raw.txt",
    url="https://www.gutenberg.org/ebooks/1012.txt.utf-8",
    sha256=None,
    mirror_sha256="81f9544d85aff13c525d5f7e5428e628a6acbe60ad749f9df1ccf952f34de4a9",
)
SHAKESPEARE = RemoteFile(
    name="shakespeare/input.txt",
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)

_HEADINGS = re.compile(
    r"^(la divina commedia|di dante alighieri|inferno|purgatorio|paradiso|produced by.*"
    r"|(inferno|purgatorio|paradiso)\s*[•:\-]\s*canto\s+[ivxlc]+)$",
    re.IGNORECASE,
)
_APOSTROPHES_AND_DASHES = re.compile(r"['’‘`ʼ\-–—‐]")


def normalise_divina(text: str) -> str:
    """The notebook's normalisation of the Divina Commedia.

    1. drop Project Gutenberg's header and licence (before "*** START OF ..." and from
       "*** END OF ..." / "End of Project Gutenberg" on), where present;
    2. drop heading lines: the title, author, the three canticles and the 100 "Inferno • Canto I"
       headings;
    3. lower-case; 4. apostrophes and dashes become spaces; 5. delete every other character that
    is neither a letter nor whitespace (punctuation, guillemets, digits);
    6. collapse all whitespace, newlines included, to single spaces.
    The result is ~504k characters over 37 symbols: space, 24 letters and 12 accented vowels."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text,
                    re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    lines = [line for line in text.splitlines() if not _HEADINGS.match(line.strip())]
    text = _APOSTROPHES_AND_DASHES.sub(" ", "\n".join(lines).lower())
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c).startswith("L"))
    return " ".join(text.split())


# part of every cache entry's name: raise it when a normalisation or the cache layout changes
CACHE_FORMAT = 2

SOURCES = {
    "divina": (DIVINA, normalise_divina),
    "shakespeare": (SHAKESPEARE, lambda text: text),  # unchanged, to compare with nanoGPT
}


def cached_meta(bin_path: Path, meta_path: Path) -> dict | None:
    """The description of a complete cache entry, or None (missing, unreadable or cut short)."""
    try:
        meta = json.loads(meta_path.read_text())
        complete = bin_path.stat().st_size == 2 * meta["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


class TextDataModule(L.LightningDataModule):
    kind = "text"

    def __init__(
        self,
        name: str = "divina",
        data_dir: str = "data",
        mirror: str | None = None,
        path: str | None = None,
        tokenizer: str = "char",
        seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        sampling: str = "random",
        seed: int = 42,
    ):
        super().__init__()
        if tokenizer not in ("char", "gpt2"):
            raise ConfigError(f"data.tokenizer={tokenizer} is not known; use char or gpt2")
        if not path and name not in SOURCES:
            raise ConfigError(f"data.name={name} is not a known text ({', '.join(SOURCES)}); or give data.path=FILE")
        self.name = Path(path).stem if path else name
        self.data_dir, self.mirror, self.path = Path(data_dir), mirror, path
        self.tokenizer_name = tokenizer
        self.seq_len = seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        if sampling not in ("random", "sequential"):
            raise ConfigError(f"data.sampling={sampling} is not known; use random (windows anywhere) or "
                              "sequential (the text in order, for recurrent models that carry their state)")
        self.sequential = sampling == "sequential"
        self.seed = seed
        self.batches_per_step = 1
        self._load()

    def _source(self) -> tuple[Path, Callable[[str], str], str]:
        """(the source file, how its text is normalised, that normalisation's name)."""
        if self.path:
            source = Path(self.path).expanduser()
            if not source.is_file():
                raise DataError(f"data.path={self.path}: no such file; give a UTF-8 text file.")
            return source, (lambda text: text), "as-is"  # your own text is used as it is
        remote, normalise = SOURCES[self.name]
        return fetch(remote, self.data_dir, self.mirror), normalise, self.name

    def _load(self) -> None:
        source, normalise, normalisation = self._source()
        # the cache entry is named by what it is made from, never by a file name: the source's bytes,
        # their normalisation and the tokenizer (two texts called divina.txt never share an entry)
        source_sha256 = sha256_of(source)
        made_from = f"{source_sha256}|{normalisation}|{self.tokenizer_name}|{CACHE_FORMAT}"
        stem = f"{self.name}.{self.tokenizer_name}.{hashlib.sha256(made_from.encode()).hexdigest()[:16]}"
        bin_path, meta_path = self.data_dir / "tokens" / f"{stem}.bin", self.data_dir / "tokens" / f"{stem}.json"
        meta = cached_meta(bin_path, meta_path)
        if meta is None:
            meta = self._tokenise(source, normalise, source_sha256, bin_path, meta_path)
        else:
            log.info("%s: using the cached tokens %s", self.name, bin_path)
        self.tokenizer = (
            CharTokenizer(meta["chars"]) if self.tokenizer_name == "char" else GPT2Tokenizer(self.mirror)
        )
        self.tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")
        n = len(self.tokens)
        n_train = int(n * (1 - self.val_fraction - self.test_fraction))
        n_val = int(n * self.val_fraction)
        self.ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        if n_val <= self.seq_len:
            raise DataError(f"the validation split has {n_val} tokens, not more than data.seq_len={self.seq_len}; "
                            "use a longer text or a smaller data.seq_len")

    def _tokenise(self, source: Path, normalise, source_sha256: str, bin_path: Path, meta_path: Path) -> dict:
        try:
            text = source.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as err:
            raise DataError(f"{source} is not UTF-8 text ({err}); convert it, e.g. iconv -f latin1 -t utf-8.") from None
        text = normalise(text)
        if len(text) < 100:
            raise DataError(f"{source} holds only {len(text)} characters of text; give a longer file.")
        if self.tokenizer_name == "char":
            tokenizer = CharTokenizer.from_text(text)
            meta = {"chars": tokenizer.chars}
        else:
            tokenizer = GPT2Tokenizer(self.mirror)
            meta = {}
        ids = np.array(tokenizer.encode(text), dtype=np.uint16)  # GPT-2's 50,257 ids fit in 16 bits
        check_writable_folder(bin_path.parent, DataError, "set paths.data_dir to a folder you can write")
        atomic_write_stream(bin_path, io.BytesIO(ids.tobytes()))
        meta.update(characters=len(text), tokens=len(ids), source=str(source), source_sha256=source_sha256)
        atomic_write_text(meta_path, json.dumps(meta))
        log.info("%s: %s characters -> %s %s tokens, cached in %s", self.name, f"{len(text):,}",
                 f"{len(ids):,}", self.tokenizer_name, bin_path)
        return meta

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def has_test(self) -> bool:
        start, end = self.ranges["test"]
        return end - start > self.seq_len

    def split_tokens(self, split: str) -> torch.Tensor:
        start, end = self.ranges[split]
        return torch.from_numpy(self.tokens[start:end].astype(np.int64))

    def train_dataloader(self):
        tokens = self.split_tokens("train")
        if self.sequential:
            stream = StreamBatches(tokens, self.seq_len, self.batch_size, self.batches_per_step,
                                   start=lambda: resume_position(self), replica=replica(self))
        else:
            shard = replica(self)
            per_epoch = max(1, len(tokens) // (shard[1] * self.batch_size * self.seq_len * self.batches_per_step))
            stream = WindowBatches(tokens, self.seq_len, self.batch_size, per_epoch, self.batches_per_step, self.seed,
                                   start=lambda: resume_position(self), replica=shard)
        stream.one_batch = overfitting(self)
        return stream

    def training_widths(self) -> list[int]:
        """The widths a training batch can have: always ``seq_len``."""
        return [self.seq_len]

    def _fixed_windows(self, split: str) -> FixedBatches:
        tokens = self.split_tokens(split)
        n = -(-(len(tokens) - 1) // self.seq_len)  # windows that cover every target once
        x = torch.zeros(n, self.seq_len, dtype=torch.long)
        y = torch.full((n, self.seq_len), -1, dtype=torch.long)
        inputs, targets = tokens[:-1], tokens[1:]
        x.view(-1)[: len(inputs)] = inputs
        y.view(-1)[: len(targets)] = targets
        return FixedBatches(x, y, self.eval_batch_size, replica(self))

    def val_dataloader(self):
        return self._fixed_windows("val")

    def test_dataloader(self):
        return self._fixed_windows("test" if self.has_test else "val")
