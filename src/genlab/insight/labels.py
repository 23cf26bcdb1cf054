"""Printable labels for a character vocabulary, for the pictures' axes and the embedding projector."""

from __future__ import annotations


def character_labels(model) -> list[str] | None:
    """One printable label per token id, for character vocabularies (None for BPE)."""
    tokenizer = model.hparams.get("tokenizer") or {}
    if tokenizer.get("type") != "char":
        return None
    return [{"\n": "\\n", " ": "␣"}.get(c, c) for c in tokenizer["chars"]]
