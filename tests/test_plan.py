"""The run plan (genlab.run.plan) resolved first and recorded once, and the writes that clean up after
themselves (genlab.run.outputs)."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
import tracemalloc

import pytest
import torch
from conftest import compose_config, run_training, snapshot
from omegaconf import OmegaConf

from genlab.run import outputs
from genlab.errors import DiskFull
from genlab.run.outputs import atomic_torch_save, atomic_write_text
from genlab.run.plan import resolve
from genlab.cli.train import train

SMALL = ["loop.updates_per_step=10", "model.n_hidden=32", "trainer.max_steps=20", "val_every=20", "num_samples=0",
         "logger=csv"]


def recorded_plan(run_dir):
    return json.loads((run_dir / ".hydra" / "plan.json").read_text())


# --- the plan -------------------------------------------------------------------------------------
def test_the_plan_is_resolved_before_training_recorded_once_and_never_changed(names_file, tmp_path, capsys):
    """tune_lr's rate once went into cfg after the folder was claimed: .hydra/config.yaml held the
    rate from before the search while the checkpoint trained with the other. Now the command's cfg
    stays as it was, the plan's is read-only, and the record, the checkpoint and the plan agree."""
    run_dir = tmp_path / "run"
    cfg = compose_config([f"data.path={names_file}", *SMALL, "tune_lr=true", "lr_finder.num_training=20",
                          "val_every=null"], run_dir)
    given = copy.deepcopy(cfg)
    train(cfg)
    assert cfg == given  # nothing changed the command's config (val_every stays null, lr as given)

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    trained_with = checkpoint["hyper_parameters"]["optimizer"]["lr"]
    assert trained_with != given.optimizer.lr
    record = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert record.optimizer.lr == trained_with and record.val_every == 10  # a twentieth of 20 updates, made a multiple of K=10
    plan = recorded_plan(run_dir)
    assert plan["config"]["optimizer"]["lr"] == trained_with and plan["updates_per_step"] == 10
    assert plan["data"] and checkpoint["genlab_plan"] == plan["identity"]  # the plan it trained under

    # continued, it trains on with the rate its search found, without searching again
    run_training(run_dir, [f"data.path={names_file}", *SMALL, "tune_lr=true", "lr_finder.num_training=20",
                           "val_every=null", "trainer.max_steps=40", f"ckpt_path={run_dir}"])
    assert "LR finder" not in capsys.readouterr().out.split("LR finder", 1)[1]
    continued = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert continued["global_step"] == 40 and continued["hyper_parameters"]["optimizer"]["lr"] == trained_with


def test_nothing_changes_the_plan_after_it_is_resolved(names_file, tmp_path):
    plan = resolve(compose_config([f"data.path={names_file}", *SMALL], tmp_path / "run"))
    with pytest.raises(Exception, match="read-only"):
        plan.cfg.optimizer.lr = 0.5
    with pytest.raises(Exception, match="read-only"):
        plan.cfg.val_every = 5
    assert plan.with_values(lr=0.5).cfg.optimizer.lr == 0.5 and plan.cfg.optimizer.lr != 0.5


# what a model's own training hooks update: the rest of a built object is fixed once its plan is claimed
TRAINING_STATE = {"training", "tokens_seen", "best_val_loss", "curve", "step_losses", "compiled_update"}


def settings_of(built) -> dict:
    """A built object's attributes, less Lightning's (private ones, the attached trainer) and its training
    state, as values to compare (``state_of``)."""
    return {k: state_of(v) for k, v in vars(built).items() if not k.startswith("_") and k not in ("trainer", *TRAINING_STATE)}


def state_of(value):
    """Plain values and tensors as copies (compared by value), containers item by item, anything else (a
    tokenizer, a memory map) by identity."""
    if isinstance(value, torch.Tensor):
        return "tensor", id(value), value.tolist()
    if isinstance(value, dict):
        return {k: state_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value), [state_of(v) for v in value]
    if isinstance(value, (bool, int, float, str, bytes, type(None), set, frozenset, os.PathLike)):
        return copy.deepcopy(value)
    return "object", id(value)


@pytest.mark.parametrize("kind", ["names, tune_lr", "text, final whole split"])
def test_nothing_changes_the_built_data_module_or_model_after_the_plan_is_claimed(kind, names_file, text_file, tmp_path,
                                                                                    monkeypatch):
    """The final evaluation of data.final_whole_split=true once set datamodule.whole_split, after the
    plan was recorded: now the whole split is an argument of that evaluation's loaders."""
    from genlab.cli import train as train_module
    from genlab.run.runs import RunFolder

    built, at_claim = {}, {}
    resolve_k, claim = train_module.resolve_updates_per_step, RunFolder.claim

    def resolve_updates_per_step(model, datamodule, *args):  # the run's last step before its claim
        built.update(model=model, datamodule=datamodule)
        return resolve_k(model, datamodule, *args)

    def claimed(folder, plan):
        at_claim.update({name: settings_of(obj) for name, obj in built.items()})
        claim(folder, plan)

    monkeypatch.setattr(train_module, "resolve_updates_per_step", resolve_updates_per_step)
    monkeypatch.setattr(RunFolder, "claim", claimed)
    if kind.startswith("names"):
        overrides = [f"data.path={names_file}", *SMALL, "tune_lr=true", "lr_finder.num_training=20"]
    else:
        overrides = ["model=gpt", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "data=divina",
                     f"data.path={text_file}", "data.seq_len=16", "data.batch_size=4", "data.val_tokens=64",
                     "data.final_whole_split=true", "trainer.max_steps=2", "val_every=2", "logger=none", "num_samples=0"]
    metrics = run_training(tmp_path / "run", overrides)
    assert metrics["status"] == "completed" and at_claim.keys() == {"model", "datamodule"}
    for name, obj in built.items():
        assert settings_of(obj) == at_claim[name], name
    if kind.startswith("text"):
        assert metrics["val_whole_split"] and metrics["val_tokens"] > 64  # the final figures: the whole split


def test_an_explicit_continuation_says_what_it_continues_and_what_differs(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    first = recorded_plan(run_dir)
    assert first["continues"] is None
    run_training(run_dir, [f"data.path={names_file}", *SMALL, "trainer.max_steps=40", f"ckpt_path={run_dir}"])
    plan = recorded_plan(run_dir)
    assert plan["continues"]["step"] == 20 and plan["continues"]["differs"] == ["trainer.max_steps: 20 -> 40"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["genlab_plan"] == plan["identity"] != first["identity"]


def test_the_data_content_is_part_of_the_plan(names_file, tmp_path):
    """The same command on an edited word list is another run (the fingerprint is the data module's own)."""
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    before = snapshot(run_dir)
    names_file.write_text(names_file.read_text() + "zelda\n")
    with pytest.raises(Exception, match="data \\(content fingerprint\\)"):
        train(compose_config([f"data.path={names_file}", *SMALL], run_dir))
    assert snapshot(run_dir) == before


# --- writes that clean up after themselves ----------------------------------------------------------
def test_temporary_files_of_killed_saves_are_removed_at_the_next_start(names_file, tmp_path):
    run_dir = tmp_path / "run"
    run_training(run_dir, [f"data.path={names_file}", *SMALL])
    left = run_dir / "checkpoints" / ".last.ckpt.0123abcd.tmp"  # what a save killed mid-write leaves
    left.write_bytes(b"x" * 1000)
    mine = run_dir / "checkpoints" / ".notes.tmp"  # not genlab's: kept
    mine.write_text("mine")
    run_training(run_dir, [f"data.path={names_file}", *SMALL, "trainer.max_steps=40", f"ckpt_path={run_dir}"])
    assert not left.exists() and mine.read_text() == "mine"


def test_a_full_disk_when_the_temporary_file_is_created_is_the_one_message(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    real_open = os.open

    def full(path, flags, *args):
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", full)
    with pytest.raises(DiskFull, match="is full.*the previous metrics.json is whole"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_full_disk_in_the_middle_of_a_checkpoint_is_the_one_message(tmp_path, monkeypatch):
    class Full:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    original = outputs._Counted.__init__

    def counted(self, file):
        original(self, Full(file))

    monkeypatch.setattr(outputs._Counted, "__init__", counted)
    with pytest.raises(DiskFull, match="writing last.ckpt"):
        atomic_torch_save({"w": torch.zeros(1000)}, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []


def test_the_folder_is_synced_after_the_rename_and_the_umask_is_left_alone(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    def no_umask(*args):
        raise AssertionError("os.umask changes the mask of every thread of the process")

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    monkeypatch.setattr(outputs.os, "umask", no_umask)
    atomic_write_text(tmp_path / "a.txt", "a")
    assert synced == [False, True]  # the file, then its folder (after the rename)


def test_a_checkpoint_is_streamed_to_its_file_not_built_in_memory(tmp_path):
    """Peak Python memory of saving a 16 MiB checkpoint of 16 tensors: the issue's bound is 1.2x the
    file's size; serialising into memory first took 1.13x, streaming takes about one tensor's copy
    at most, so the test asks for under a third."""
    state = {f"layer{i}.weight": torch.randn(256 * 1024) for i in range(16)}
    atomic_torch_save(state, tmp_path / "warm.ckpt")  # torch's first save imports and caches things
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        atomic_torch_save(state, tmp_path / "last.ckpt")
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    size = (tmp_path / "last.ckpt").stat().st_size
    assert peak < size / 3, f"peak {peak:,} bytes above the baseline for a {size:,}-byte checkpoint"
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["layer3.weight"], state["layer3.weight"])
