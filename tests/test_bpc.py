"""Bits per character: one scale for every language model, whatever its tokenizer."""

from __future__ import annotations

import math

import pytest
from conftest import hparams_of, run_eval, run_training

from genlab.data.tokenizer import CharTokenizer, GPT2Tokenizer
from genlab.models.base import LanguageModel

GPT = ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "loop.updates_per_step=1"]


def text_run(tmp_path, text_file, tokenizer: str, *extra) -> dict:
    return run_training(tmp_path / tokenizer, GPT + [
        "data=divina", f"data.path={text_file}", f"data.tokenizer={tokenizer}", "data.seq_len=16",
        "data.batch_size=8", "data.test_fraction=0.1", "trainer.max_steps=60", "val_every=30", *extra])


def test_a_character_and_a_bpe_model_of_the_same_text_sit_on_one_scale(text_file, tmp_path, mirror, monkeypatch):
    char = text_run(tmp_path, text_file, "char")
    # for characters, bits per character is the loss in bits
    assert char["val_bpc"] == pytest.approx(char["val_loss"] / math.log(2), rel=1e-6)
    assert char["test_bpc"] == pytest.approx(char["test_loss"] / math.log(2), rel=1e-6)
    _, shown = hparams_of(tmp_path / "char")  # TensorBoard's curves, and so its HPARAMS columns
    assert shown["loss/val_bpc"] == pytest.approx(char["val_bpc"], rel=1e-5) and "loss/test_bpc" in shown

    bpe = text_run(tmp_path, text_file, "gpt2", f"paths.data_mirror={mirror}")
    print(f"char: loss {char['val_loss']:.3f} bpc {char['val_bpc']:.3f}; bpe: loss {bpe['val_loss']:.3f} bpc {bpe['val_bpc']:.3f}")
    # per token the two losses are on different scales (a BPE token holds several characters) ...
    assert bpe["val_loss"] > 1.5 * char["val_loss"]
    # ... per character they measure the same thing: both well under a uniform guess over the letters
    letters = math.log2(len(set(text_file.read_text())))
    assert char["val_bpc"] < letters and bpe["val_bpc"] < letters
    assert abs(bpe["val_bpc"] - char["val_bpc"]) < 0.5 * char["val_bpc"]

    # a GPT-2 evaluation batch is evaluated a few rows at a time (its logits at once would take
    # gigabytes): one row at a time gives the same figures
    assert 1 < LanguageModel.eval_logits // (16 * 50257) < 64  # the run's batches of 64 rows were cut
    monkeypatch.setattr(LanguageModel, "eval_logits", 1)
    again = run_eval([f"ckpt_path={tmp_path / 'gpt2'}", f"paths.data_dir={tmp_path / 'data'}"])
    assert again["val_loss"] == pytest.approx(bpe["val_loss"], rel=1e-6)
    assert again["val_bpc"] == pytest.approx(bpe["val_bpc"], rel=1e-6)


def test_characters_per_token_count_every_character_once(mirror):
    text = "perché là è già così, ὅτι 𝄞 città"  # accents, Greek and a 4-byte symbol split by BPE
    bpe = GPT2Tokenizer(mirror)
    table = bpe.characters_per_token()
    ids = bpe.encode(text)
    assert sum(table[i] for i in ids) == len(text)
    assert any(table[i] == 0 for i in ids)  # a token holding only the rest of a character adds none
    assert CharTokenizer.from_text(text).characters_per_token() == [1] * len(set(text))
