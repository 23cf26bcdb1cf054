"""What a validation of running text covers, sized to the run (genlab.run.checks.validation_size): the
tokens trained between two validations, at least one evaluation batch, at most data.val_tokens;
evaluation batches of about EVAL_BATCH_TOKENS tokens. Resolved in the plan from the config alone."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch
from conftest import compose_config, run_training

from genlab.run.checks import EVAL_BATCH_TOKENS
from genlab.console import run_summary
from genlab.data.text import TextDataModule
from genlab.errors import ConfigError
from genlab.run.plan import resolve
from genlab.cli.train import validation_words
from genlab.data.module import ready

TEXT = ["model=gpt", "data=divina", "data.seq_len=64", "data.batch_size=8"]


def planned(tmp_path, overrides: list[str]):
    """The data config the run's plan resolves (nothing is loaded)."""
    return resolve(compose_config([*TEXT, *overrides], tmp_path / "run")).cfg


def test_a_validation_covers_the_tokens_trained_between_two_validations(tmp_path):
    assert planned(tmp_path, ["val_every=100"]).data.val_tokens == 100 * 8 * 64
    assert planned(tmp_path, ["val_every=100", "data.batch_size=16"]).data.val_tokens == 100 * 16 * 64
    # val_every=null: a twentieth of the run
    assert planned(tmp_path, ["val_every=null", "trainer.max_steps=4000"]).data.val_tokens == 200 * 8 * 64


def test_data_val_tokens_caps_it_and_null_is_the_whole_split(tmp_path):
    assert planned(tmp_path, ["val_every=100", "data.val_tokens=40000"]).data.val_tokens == 40_000
    assert planned(tmp_path, ["val_every=100_000"]).data.val_tokens == 2_000_000  # the default cap
    assert planned(tmp_path, ["val_every=100", "data.val_tokens=null"]).data.val_tokens is None


def test_a_tiny_run_still_validates_one_evaluation_batch(tmp_path):
    cfg = planned(tmp_path, ["trainer.max_steps=2", "val_every=null"])  # the user's case: 2 updates
    assert cfg.val_every == 1 and cfg.data.eval_batch_size == EVAL_BATCH_TOKENS // 64
    assert cfg.data.val_tokens == EVAL_BATCH_TOKENS  # one batch, not the 512 tokens trained in an update
    assert planned(tmp_path, ["trainer.max_steps=2", "data.val_tokens=64"]).data.val_tokens == 64  # the cap wins


@pytest.mark.parametrize("val_every", [None, 70])
def test_the_budget_is_the_same_whatever_the_updates_per_step(tmp_path, val_every):
    """K rounds the validation interval (val_every=null: 2,000 updates / 20 = 100, as 98 with K=7), never
    what a validation covers."""
    sizes = {}
    for k in (1, 7):
        cfg = planned(tmp_path, [f"loop.updates_per_step={k}", "trainer.max_steps=2000", f"val_every={val_every or 'null'}"])
        sizes[k] = (cfg.data.val_tokens, cfg.data.eval_batch_size)
        assert cfg.val_every == (val_every or (100 if k == 1 else 98))
    assert sizes[1] == sizes[7] == ((val_every or 100) * 8 * 64, 512)


def test_evaluation_batches_are_sized_for_throughput_unless_given(tmp_path):
    assert planned(tmp_path, []).data.eval_batch_size == EVAL_BATCH_TOKENS // 64
    assert planned(tmp_path, ["data.seq_len=16384"]).data.eval_batch_size == 8  # at least the training batch
    assert planned(tmp_path, ["data.eval_batch_size=3"]).data.eval_batch_size == 3
    # the floor is one evaluation batch of the size given
    assert planned(tmp_path, ["data.eval_batch_size=20", "trainer.max_steps=2"]).data.val_tokens == 20 * 64


def test_the_data_module_sizes_its_evaluation_batch_the_same_way(text_file, tmp_path):
    dm = TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, batch_size=4)
    assert dm.eval_batch_size == EVAL_BATCH_TOKENS // 16
    assert TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=5).eval_batch_size == 5


@pytest.mark.parametrize("setting", ["data.eval_batch_size=0", "data.eval_batch_size=-2", "data.val_tokens=0",
                                     "data.val_tokens=abc"])
def test_bad_sizes_name_the_setting_and_the_fix(tmp_path, setting):
    with pytest.raises(ConfigError, match=rf"{setting.split('=')[0]} must be a whole number of at least 1, or null"):
        planned(tmp_path, [setting])


def test_the_summary_line_says_what_a_validation_covers(text_file, tmp_path):
    dm = ready(TextDataModule(path=str(text_file), data_dir=tmp_path, seq_len=16, eval_batch_size=2, val_tokens=128))
    start, end = dm.ranges["val"]
    words = validation_words(dm, 100)
    assert words == f"validation: a fixed sample of 128 of its {end - start - 1:,} tokens (data.val_tokens) every 100 updates"
    trainer = types.SimpleNamespace(num_devices=1, precision="32-true", max_steps=2000)
    line = run_summary({"model": "gpt", "data": "divina", "trainer": "cpu"}, torch.nn.Linear(10, 10), trainer,
                       "outputs/x", validation=words)
    assert line == f"gpt on divina: 110 parameters, 1x cpu (32-true), 2,000 updates; {words} -> outputs/x"


def test_a_run_records_and_says_what_its_validations_cover(text_file, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="genlab"):
        metrics = run_training(run_dir, [
            "model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina", f"data.path={text_file}",
            "data.seq_len=16", "data.batch_size=4", "data.eval_batch_size=2", "trainer.max_steps=4", "val_every=2",
            "logger=none", "num_samples=0"])
    data = json.loads((run_dir / ".hydra" / "plan.json").read_text())["config"]["data"]
    assert data["val_tokens"] == 2 * 4 * 16 and data["eval_batch_size"] == 2  # the plan holds the sizes
    assert metrics["val_tokens"] == 128 and not metrics["val_whole_split"]
    assert "validation: a fixed sample of 128 of its" in caplog.text and "every 2 updates" in caplog.text
