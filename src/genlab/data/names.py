"""The Italian first names (``data=names``), or any word list given by ``data.path``."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from genlab.data.batches import FixedBatches, SequenceBatches, context_windows, replica
from genlab.data.fetch import RemoteFile, fetch, sha256_of
from genlab.data.module import GenlabDataModule
from genlab.errors import ConfigError, DataError
from genlab.data.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

ITALIAN_NAMES = RemoteFile(
    name="names/nomi_italiani.raw.txt",
    url="https://gist.githubusercontent.com/pdesterlich/2562329/raw/"
    "7c09ac44d769539c61df15d5b3c441eaebb77660/nomi_italiani.txt",
    sha256="48e5c7de82ab6f4c656ac7acdd1377ade6eb1ae97d463685adb162df5be3a718",
)

BOUNDARY = "."  # start and end token, id 0

# The gist's accented letters are cp1252 bytes that were decoded as Mac Roman.
MOJIBAKE = str.maketrans({"‡": "à", "˘": "ù", "Ú": "ò", "Ï": "ì", "Ë": "è"})


@dataclass
class CleaningReport:
    raw: int
    repaired: int  # the gist only: mis-encoded accents repaired
    punctuation: int  # entries holding punctuation or symbols (or '.', the start/end token)
    digits: int
    too_long: int
    duplicates: int
    kept: int

    def __str__(self) -> str:
        dropped = [f"{n} {why}" for n, why in ((self.punctuation, "with punctuation or symbols"),
                                               (self.digits, "with digits"), (self.too_long, "too long"),
                                               (self.duplicates, "duplicates")) if n]
        repaired = f"repaired mis-encoded accents in {self.repaired}; " if self.repaired else ""
        return (f"names: {self.raw:,} entries -> {self.kept:,} names "
                f"({repaired}dropped {', '.join(dropped) if dropped else 'none'})")


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def is_word(entry: str) -> bool:
    """Letters (any script, with their combining marks), '-' and apostrophes, with at least one letter."""
    return any(c.isalpha() for c in entry) and all(
        c.isalpha() or c in "-'’" or unicodedata.category(c).startswith("M") for c in entry)


def is_gist_name(entry: str) -> bool:
    """The course's alphabet: letters a-z and '-' only, with at least one letter."""
    return any(c.isalpha() for c in entry) and all(c == "-" or (c.isalpha() and c.isascii()) for c in entry)


def clean_names(text: str, gist: bool = False, lowercase: bool = True,
                max_length: int = 50) -> tuple[list[str], CleaningReport]:
    """Clean a word list, one entry per line: drop blank lines, join whitespace inside an entry
    with '-', lower-case (``lowercase``), keep entries of letters (any script), '-' and
    apostrophes; drop entries longer than ``max_length`` characters (every name is padded to the
    longest: one 20,000-letter line would make every batch that wide) and duplicates, keeping
    the first. The vocabulary is then the characters the list uses.

    ``gist``: the Italian gist's own rules (those of ``nomi_italiani.clean.txt`` in the data
    mirror's README): drop its disclaimer, which ends with a line of dashes; repair its mis-encoded
    accents, then strip accents; keep a-z and '-' only (the course's 27 symbols)."""
    lines = text.splitlines()
    header_end = next((i for i, line in enumerate(lines[:20]) if line.strip().startswith("----")), -1) if gist else -1
    entries = ["-".join(line.split()) for line in lines[header_end + 1 :] if line.strip()]
    repaired = sum(1 for e in entries if e != e.translate(MOJIBAKE)) if gist else 0
    if gist:  # repair before lower-casing: the mojibake characters are upper-case letters
        entries = [strip_accents(e.translate(MOJIBAKE)) for e in entries]
    else:  # one code for é, whether the file spells it as one character or e + accent
        entries = [unicodedata.normalize("NFC", e) for e in entries]
    if lowercase or gist:
        entries = [e.lower() for e in entries]
    keep = is_gist_name if gist else is_word
    words = [e for e in entries if keep(e)]
    digits = sum(1 for e in entries if not keep(e) and any(c.isdigit() for c in e))
    short = [e for e in words if len(e) <= max_length]
    unique = list(dict.fromkeys(short))
    report = CleaningReport(len(entries), repaired, len(entries) - len(words) - digits, digits,
                            len(words) - len(short), len(short) - len(unique), len(unique))
    return unique, report


def encode_names(names: list[str], tokenizer: CharTokenizer, width: int):
    """x = '.' + name, y = name + '.', right-padded to ``width`` (x with 0, y with -1)."""
    x = torch.zeros(len(names), width, dtype=torch.long)
    y = torch.full((len(names), width), -1, dtype=torch.long)
    for row, name in enumerate(names):
        ids = tokenizer.encode(name)
        x[row, 1 : len(ids) + 1] = torch.tensor(ids)
        y[row, : len(ids) + 1] = torch.tensor(ids + [tokenizer.eos_id])
    return x, y


class NamesDataModule(GenlabDataModule):
    """Names as sequences: batch ``(x, y)`` of shape (B, T) with T the longest name + 1, trimmed per
    batch to its own longest name. Splits 80/10/10 from ``seed``; the vocabulary is '.' + the
    characters of all names (a list of your own keeps its letters, accents and scripts)."""

    def __init__(
        self,
        data_dir: str = "data",
        mirror: str | None = None,
        path: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        seed: int = 42,
        split: tuple[float, float] = (0.8, 0.9),
        sampling: str = "names",
        block_size: int = 8,
        max_name_length: int = 50,
        lowercase: bool = True,
    ):
        super().__init__()
        self.data_dir = data_dir
        self.mirror = mirror
        self.path = path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.split = split
        if sampling not in ("names", "windows"):
            raise ConfigError(f"data.sampling={sampling}: use names (batches of whole names) or windows "
                              "(batches of random context windows, as the notebook samples)")
        self.sampling, self.block_size = sampling, block_size
        self.max_name_length = max_name_length
        self.lowercase = lowercase

    def download(self) -> None:
        self.source = Path(self.path).expanduser() if self.path else fetch(ITALIAN_NAMES, self.data_dir, self.mirror)

    def load(self) -> None:
        source = self.source
        if self.path:
            if not source.exists():
                raise DataError(f"data.path={self.path}: no such file. Give an existing word list, one entry per line.")
            self.fingerprint = sha256_of(source)  # the run's plan compares it (genlab.run.plan)
        else:
            self.fingerprint = ITALIAN_NAMES.sha256  # fetch checked the file against it
        try:
            text = source.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
        except UnicodeDecodeError as err:
            raise DataError(f"{source} is not UTF-8 text ({err}); convert it with iconv -t utf-8.") from None
        names, report = clean_names(text, gist=not self.path, lowercase=self.lowercase, max_length=self.max_name_length)
        if not names:
            raise DataError(f"{source} holds no usable names ({report}); give a list with one name per line.")
        log.info("%s", report)
        if report.too_long:
            log.warning("%s: dropped %d entries longer than data.max_name_length=%d characters", source,
                        report.too_long, self.max_name_length)
        self.report = report
        self.names = names
        self.tokenizer = CharTokenizer.from_text("".join(names), boundary=BOUNDARY)
        self.max_len = max(len(n) for n in names)
        self.seq_len = self.max_len + 1  # the longest name plus its end token

        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n1, n2 = int(self.split[0] * len(names)), int(self.split[1] * len(names))
        self.splits = {
            "train": [names[i] for i in order[:n1]],
            "val": [names[i] for i in order[n1:n2]],
            "test": [names[i] for i in order[n2:]],
        }
        sizes = {split: len(part) for split, part in self.splits.items()}
        batch_of_names = self.batch_size if self.sampling == "names" else 1  # windows: many per name
        if 0 in sizes.values() or sizes["train"] < batch_of_names:
            raise DataError(
                f"{source} gives {len(names)} names, which the split leaves as {sizes['train']} for training, "
                f"{sizes['val']} for validation and {sizes['test']} for test; each split needs a name and training "
                f"a batch of data.batch_size={self.batch_size}: give a longer list or a smaller data.batch_size")
        self.tensors = {k: encode_names(v, self.tokenizer, self.seq_len) for k, v in self.splits.items()}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def model_sizes(self) -> dict:
        return {"tokenizer": self.tokenizer.to_config(), "seq_len": self.seq_len, "sequential": False}

    def train_dataloader(self):
        x, y = self.tensors["train"] if self.sampling == "names" else self.training_windows()
        stream = SequenceBatches(x, y, self.batch_size, self.seed, loop=self)
        return stream

    def training_windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (context, next character) pair of the training names, as the notebook builds its
        dataset: x (N, block_size) the ``block_size`` characters before the target (left-padded with '.'),
        y (N, block_size) all -1 (no target) except the last position, the character that follows."""
        x, y = self.tensors["train"]
        real = y >= 0
        contexts = context_windows(x, self.block_size, pad_id=self.tokenizer.eos_id)[real]
        targets = torch.full_like(contexts, -1)
        targets[:, -1] = y[real]
        return contexts, targets

    def training_widths(self) -> list[int]:
        """The widths a training batch can have: its longest name + 1, or the window."""
        return [self.block_size] if self.sampling == "windows" else list(range(2, self.seq_len + 1))

    def val_dataloader(self):
        return FixedBatches(*self.tensors["val"], self.eval_batch_size, replica(self))

    def test_dataloader(self):
        return FixedBatches(*self.tensors["test"], self.eval_batch_size, replica(self))

    def training_words(self) -> set[str]:
        """What sampling compares against to measure novelty."""
        return set(self.splits["train"])
