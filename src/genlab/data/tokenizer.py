"""Tokenizers. Each one is saved inside every checkpoint as a small dict (``to_config``), which is
all that sampling needs to turn ids back into text."""

from __future__ import annotations

from typing import Protocol

from genlab.errors import DataError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None  # the token that ends a sequence (names' '.'), None for running text

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_config(self) -> dict: ...
    def characters_per_token(self) -> list[int]: ...


class CharTokenizer:
    """One id per character, in the order given. With ``boundary`` set (names: '.'), that
    character is id 0 and marks both the start and the end of a sequence."""

    def __init__(self, chars: str, boundary: str | None = None):
        if boundary is not None:
            chars = boundary + chars.replace(boundary, "")
        if len(set(chars)) != len(chars):
            raise ValueError(f"duplicate characters in vocabulary {chars!r}")
        self.chars = chars
        self.boundary = boundary
        self.vocab_size = len(chars)
        self.eos_id = 0 if boundary is not None else None
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, boundary: str | None = None) -> "CharTokenizer":
        return cls("".join(sorted(set(text))), boundary)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.stoi))

    def encode(self, text: str) -> list[int]:
        if unknown := self.unknown_chars(text):
            raise ValueError(
                f"characters not in the vocabulary: {unknown}; the vocabulary is {self.chars!r}"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_config(self) -> dict:
        return {"type": "char", "chars": self.chars, "boundary": self.boundary}

    def characters_per_token(self) -> list[int]:
        """Each id is one character (the boundary too: it stands for a name's newline)."""
        return [1] * self.vocab_size


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding through tiktoken (50,257 tokens).

    tiktoken downloads its two BPE files once into its cache. Offline, the files are read from
    ``<data mirror>/gpt2/{vocab.bpe,encoder.json}`` (see ``load_gpt2_encoding``)."""

    vocab_size = 50257
    eos_id = None

    def __init__(self, mirror: str | None = None):
        self.encoding = load_gpt2_encoding(mirror)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def unknown_chars(self, text: str) -> list[str]:
        return []  # byte-level BPE encodes any text

    def to_config(self) -> dict:
        return {"type": "gpt2"}

    def characters_per_token(self) -> list[int]:
        """The characters each id adds to a text: the bytes of its UTF-8 that start a character
        (not 0b10xxxxxx), so that a character split over two tokens counts once, with the first."""
        return [sum((b & 0xC0) != 0x80 for b in self.encoding.decode_single_token_bytes(i))
                for i in range(self.vocab_size)]


# sha256 of OpenAI's GPT-2 files, as tiktoken pins them
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def load_gpt2_encoding(mirror: str | None = None):
    """tiktoken's GPT-2 encoding, from the mirror's files when they exist, else tiktoken's cache
    (which downloads them on first use)."""
    import os

    import tiktoken

    mirror = mirror or os.environ.get("GENLAB_DATA_MIRROR")
    folder = os.path.join(mirror, "gpt2") if mirror else None
    if folder and os.path.exists(os.path.join(folder, "vocab.bpe")):
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
            encoder_json_file=os.path.join(folder, "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": 50256},
            explicit_n_vocab=50257,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # offline: requests' ConnectionError, a timeout, a proxy's HTTP error, ...
        raise DataError(
            f"cannot load GPT-2's BPE files ({err.__class__.__name__}: {str(err)[:160]}). tiktoken downloads "
            "them once into its cache (TIKTOKEN_CACHE_DIR), which needs the internet. Offline, point "
            "paths.data_mirror=/path/to/mirror (or the GENLAB_DATA_MIRROR environment variable) at a folder "
            "holding gpt2/vocab.bpe and gpt2/encoder.json (docs/data.md, \"Without internet: the mirror\")."
        ) from None


def tokenizer_from_config(config: dict, mirror: str | None = None) -> Tokenizer:
    if config["type"] == "char":
        return CharTokenizer(config["chars"], config.get("boundary"))
    if config["type"] == "gpt2":
        return GPT2Tokenizer(mirror)
    raise ValueError(f"unknown tokenizer type {config['type']!r} (known: char, gpt2)")
