"""Running text (``data=divina``, ``data=shakespeare``, or your own: ``data.path`` names a UTF-8
file or a folder of ``.txt`` files), as characters or GPT-2 BPE tokens.

The tokenised corpus is cached in ``<data_dir>/tokens/`` as a flat file of ``uint16`` (``uint32``
for a vocabulary above 65,536 symbols) plus a JSON with the vocabulary; it is made by streaming the
source in chunks over the cores (``genlab.data.tokens``) and read back as a memory map, so memory
does not grow with the corpus. An entry is named by a hash of what it was made from (the source's
bytes, its normalisation and the tokenizer), so no two sources share one. The split is by
position: the first 90% trains, the rest validates (``test_fraction`` > 0 carves a test split off
the end). Training batches are random windows of ``seq_len + 1`` tokens (``sampling=sequential``:
the text in order, for recurrent models that carry their state); an evaluation reads the split in
consecutive windows, or where it holds more than ``val_tokens`` tokens a fixed, evenly spread
sample of them, the same every time. A training run sizes ``val_tokens`` and ``eval_batch_size`` to
itself (``genlab.run.checks.validation_size``, resolved in its plan).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np

from genlab.run.checks import check_evaluation_sizes, sized_eval_batch
from genlab.data.batches import FixedWindows, StreamBatches, WindowBatches, replica
from genlab.data.fetch import RemoteFile, fetch, sha256_of
from genlab.data.module import GenlabDataModule
from genlab.data.tokenizer import CharTokenizer, GPT2Tokenizer
from genlab.errors import ConfigError, DataError
from genlab.data.tokens import (Progress, Source, characters_of, dtype_for, text_files,
                                write_bpe_tokens, write_char_tokens)
from genlab.run.outputs import atomic_write_text, check_writable_folder

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
CACHE_FORMAT = 3

SOURCES = {
    "divina": (DIVINA, normalise_divina),
    "shakespeare": (SHAKESPEARE, lambda text: text),  # unchanged, to compare with nanoGPT
}

# an evaluation takes at most this many tokens unless val_tokens says otherwise (a training run's
# plan lowers it to the run's own size: genlab.run.checks.validation_size)
VAL_TOKENS = 2_000_000


def cached_meta(bin_path: Path, meta_path: Path) -> dict | None:
    """The description of a complete cache entry, or None (missing, unreadable or cut short)."""
    try:
        meta = json.loads(meta_path.read_text())
        complete = bin_path.stat().st_size == np.dtype(meta["dtype"]).itemsize * meta["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


class TextDataModule(GenlabDataModule):

    def __init__(
        self,
        name: str = "divina",
        data_dir: str = "data",
        mirror: str | None = None,
        path: str | None = None,
        tokenizer: str = "char",
        seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        sampling: str = "random",
        seed: int = 42,
        val_tokens: int | None = VAL_TOKENS,
        final_whole_split: bool = False,
    ):
        super().__init__()
        if tokenizer not in ("char", "gpt2"):
            raise ConfigError(f"data.tokenizer={tokenizer} is not known; use char or gpt2")
        if not path and name not in SOURCES:
            raise ConfigError(f"data.name={name} is not a known text ({', '.join(SOURCES)}); or give data.path=FILE")
        check_evaluation_sizes(eval_batch_size, val_tokens)
        self.name = Path(path).stem if path else name
        self.data_dir, self.mirror, self.path = Path(data_dir), mirror, path
        self.tokenizer_name = tokenizer
        self.seq_len = seq_len
        self.batch_size, self.eval_batch_size = batch_size, sized_eval_batch(eval_batch_size, batch_size, seq_len)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        if sampling not in ("random", "sequential"):
            raise ConfigError(f"data.sampling={sampling} is not known; use random (windows anywhere) or "
                              "sequential (the text in order, for recurrent models that carry their state)")
        self.sequential = sampling == "sequential"
        self.seed = seed
        self.val_tokens = val_tokens
        # True: the final figures (metrics.json) cover the whole split even where validations sample it
        # (the final evaluation asks for it: val_dataloader(whole_split=True))
        self.final_whole_split = final_whole_split

    def _source(self) -> tuple[Source, str, str]:
        """(the source, its normalisation's name, what its content hash is of)."""
        if self.path:
            files = text_files(Path(self.path).expanduser())  # your own text is used as it is
            digest = hashlib.sha256()
            for file in files:  # a folder: every file's name and content, in order
                digest.update(f"{file.name if len(files) > 1 else ''}|{sha256_of(file)}|".encode())
            return Source(files), "as-is", digest.hexdigest()
        remote, normalise = SOURCES[self.name]
        file = fetch(remote, self.data_dir, self.mirror)
        return _NormalisedSource(file, normalise), self.name, sha256_of(file)

    def download(self) -> None:
        """The text fetched and its tokens in the cache (tokenised now where they are not)."""
        source, normalisation, source_sha256 = self._source()
        # the cache entry is named by what it is made from, never by a file name: the source's bytes,
        # their normalisation and the tokenizer (two texts called divina.txt never share an entry)
        made_from = f"{source_sha256}|{normalisation}|{self.tokenizer_name}|{CACHE_FORMAT}"
        # the run's plan compares this too (genlab.run.plan): the same tokens, whatever the file is called
        self.fingerprint = hashlib.sha256(made_from.encode()).hexdigest()
        stem = f"{self.name}.{self.tokenizer_name}.{self.fingerprint[:16]}"
        bin_path, meta_path = self.data_dir / "tokens" / f"{stem}.bin", self.data_dir / "tokens" / f"{stem}.json"
        meta = cached_meta(bin_path, meta_path)
        if meta is None:
            meta = self._tokenise(source, source_sha256, bin_path, meta_path)
        else:
            log.info("%s: using the cached tokens %s", self.name, bin_path)
        self.cached = (bin_path, meta)

    def load(self) -> None:
        bin_path, meta = self.cached
        self.tokenizer = (
            CharTokenizer(meta["chars"]) if self.tokenizer_name == "char" else GPT2Tokenizer(self.mirror)
        )
        self.tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
        n = len(self.tokens)
        n_train = int(n * (1 - self.val_fraction - self.test_fraction))
        n_val = int(n * self.val_fraction)
        self.ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        if n_val <= self.seq_len:
            raise DataError(f"the validation split has {n_val} tokens, not more than data.seq_len={self.seq_len}; "
                            "use a longer text or a smaller data.seq_len")
        for split in ("val", "test") if self.has_test else ("val",):
            log.info("%s: %s", self.name, self.evaluation_scope(split)["description"])

    def _tokenise(self, source: Source, source_sha256: str, bin_path: Path, meta_path: Path) -> dict:
        if source.size < 100:
            raise DataError(f"{self.path or self.name} holds only {source.size} bytes of text; give a longer file.")
        check_writable_folder(bin_path.parent, DataError, "set paths.data_dir to a folder you can write")
        passes = 2 if self.tokenizer_name == "char" else 1  # characters: find the vocabulary, then encode
        progress = Progress(self.name, passes * source.size)
        if self.tokenizer_name == "char":
            chars = characters_of(source, progress)
            count = write_char_tokens(source, chars, bin_path, progress)
            meta = {"chars": chars, "dtype": dtype_for(len(chars)).name}
        else:
            encoding = GPT2Tokenizer(self.mirror).encoding
            count = write_bpe_tokens(source, encoding, encoding.eot_token, bin_path, progress)
            meta = {"dtype": dtype_for(encoding.n_vocab).name}
        if count < 100:
            bin_path.unlink()
            raise DataError(f"{self.path or self.name} holds only {count} tokens of text; give a longer file.")
        meta.update(tokens=count, source=str(self.path or self.name), source_sha256=source_sha256)
        atomic_write_text(meta_path, json.dumps(meta))
        log.info("%s: %s MB -> %s %s tokens (%s) in %.1f s, cached in %s", self.name, f"{source.size / 1e6:,.1f}",
                 f"{count:,}", self.tokenizer_name, meta["dtype"], progress.seconds, bin_path)
        return meta

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def model_sizes(self) -> dict:
        return {"tokenizer": self.tokenizer.to_config(), "seq_len": self.seq_len, "sequential": self.sequential}

    @property
    def has_test(self) -> bool:
        start, end = self.ranges["test"]
        return end - start > self.seq_len

    def split_tokens(self, split: str) -> np.ndarray:
        """The split's tokens: a view of the memory map (nothing is read until indexed)."""
        start, end = self.ranges[split]
        return self.tokens[start:end]

    def train_dataloader(self):
        tokens = self.split_tokens("train")
        if self.sequential:
            return StreamBatches(tokens, self.seq_len, self.batch_size, loop=self)
        return WindowBatches(tokens, self.seq_len, self.batch_size, self.seed, loop=self)

    def training_widths(self) -> list[int]:
        """The widths a training batch can have: always ``seq_len``."""
        return [self.seq_len]

    def _samples(self, split: str, whole_split: bool = False) -> bool:
        """Whether an evaluation of ``split`` takes a sample: it has more than ``val_tokens`` targets
        and the whole split was not asked for."""
        start, end = self.ranges[split]
        return not whole_split and self.val_tokens is not None and end - start - 1 > self.val_tokens

    def _window_starts(self, split: str, whole_split: bool = False) -> np.ndarray:
        """Where the evaluation windows of ``split`` start: consecutive windows covering every target
        once, or in a sample ``val_tokens`` tokens' worth of whole windows spread evenly over the
        split (the same at every validation)."""
        start, end = self.ranges[split]
        if not self._samples(split, whole_split):
            return np.arange(start, end - 1, self.seq_len)
        windows = max(1, self.val_tokens // self.seq_len)
        return np.linspace(start, end - 1 - self.seq_len, windows).round().astype(np.int64)

    def _fixed_windows(self, split: str, whole_split: bool = False) -> FixedWindows:
        return FixedWindows(self.tokens, self._window_starts(split, whole_split), self.seq_len, self.ranges[split][1],
                            self.eval_batch_size, replica(self))

    def evaluation_scope(self, split: str, whole_split: bool = False) -> dict:
        """What an evaluation of ``split`` covers (of the whole split where ``whole_split``):
        ``{"tokens", "whole_split", "description"}``."""
        start, end = self.ranges[split]
        targets = end - start - 1
        if not self._samples(split, whole_split):
            return {"tokens": targets, "whole_split": True, "description": f"{split}: the whole split, {targets:,} tokens"}
        tokens = len(self._window_starts(split, whole_split)) * self.seq_len
        return {"tokens": tokens, "whole_split": False,
                "description": f"{split}: a fixed sample of {tokens:,} of its {targets:,} tokens (data.val_tokens)"}

    def val_dataloader(self, whole_split: bool = False):
        return self._fixed_windows("val", whole_split)

    def test_dataloader(self, whole_split: bool = False):
        return self._fixed_windows(self.test_split, whole_split)

    @property
    def test_split(self) -> str:
        return "test" if self.has_test else "val"


class _NormalisedSource(Source):
    """A named source (the Divina, tinyshakespeare): small, read whole to be normalised."""

    def __init__(self, file: Path, normalise: Callable[[str], str]):
        try:
            text = file.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as err:
            raise DataError(f"{file} is not UTF-8 text ({err}); convert it, e.g. iconv -f latin1 -t utf-8.") from None
        super().__init__(text=normalise(text))
