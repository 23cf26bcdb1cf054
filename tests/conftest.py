"""Shared fixtures: small data the tests make themselves, and a helper that trains through the
same code path as ``python train.py`` (Hydra compose + ``genlab.train.train``)."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from genlab.console import SILENCED_WARNINGS
from genlab.train import CONF_DIR, train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIRROR = os.environ.get("GENLAB_DATA_MIRROR") or (str(SHARED_DATA) if SHARED_DATA.exists() else None)


def pytest_configure(config):
    """pytest resets the warning filters for each test: add those genlab sets for its users."""
    for message in SILENCED_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


@pytest.fixture
def mirror() -> str:
    """The offline mirror of the real data (``../shared/data`` beside the checkout, where the Makefile and CI find it)."""
    assert MIRROR and Path(MIRROR).exists(), (
        "these tests read the real data: set GENLAB_DATA_MIRROR to a folder like ../shared/data"
    )
    return MIRROR


@pytest.fixture
def names_file(tmp_path) -> Path:
    """300 made-up names over a few syllables, one per line."""
    rng = random.Random(0)
    syllables = ["ma", "ri", "o", "lu", "ca", "gio", "van", "na", "an", "to", "el", "sa", "be", "tta"]
    names = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)})[:300]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A few thousand characters of running text."""
    rng = random.Random(1)
    words = ["nel", "mezzo", "del", "cammin", "di", "nostra", "vita", "mi", "ritrovai", "per", "una", "selva", "oscura"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(1500)), encoding="utf-8")
    return path


@pytest.fixture
def fake_gpus(monkeypatch):
    """Fakes the machine's CUDA GPUs for code that asks torch about them (not for training):
    ``fake_gpus([("Tesla T4", (7, 5)), ...])``, each a name and a compute capability."""
    import torch

    def install(cards: list[tuple[str, tuple[int, int]]]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: cards[device or 0][0])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: cards[device or 0][1])
    return install


def training_loop(updates_per_step: int = 1, rank: int = 0, world: int = 1):
    """What a training stream asks a data module's trainer for (``genlab.data.batches.BatchStream``),
    without a trainer: a data module, or the ``loop`` of a stream looked at on its own."""
    trainer = SimpleNamespace(lightning_module=SimpleNamespace(updates_per_step=updates_per_step), global_step=0,
                              global_rank=rank, world_size=world, overfit_batches=0)
    return SimpleNamespace(trainer=trainer)


def compose_config(overrides: list[str], run_dir: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={run_dir}", f"paths.data_dir={run_dir.parent / 'data'}",
                       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides],
        )


# How far below ln V (the loss of predicting every token alike) a test's short run must end to count
# as having learned, in nats. An untrained language model scores ln V within a few hundredths
# (measured: 0.04 below it at most); the tests' runs of 5-60 updates end 0.46 or more below it.
# Their losses do not depend on the machine: they fix model.updates_per_step.
LEARNED = 0.25


def untrained_loss(run_dir: Path) -> float:
    """ln V for the vocabulary in the run's checkpoint."""
    import math

    import torch

    from genlab.models.base import vocab_size_of

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return math.log(vocab_size_of(checkpoint["hyper_parameters"]["tokenizer"]))


def assert_learned(metrics: dict, run_dir: Path) -> None:
    """The run's final validation loss is clearly below an untrained model's."""
    untrained = untrained_loss(run_dir)
    assert metrics["val_loss"] < untrained - LEARNED, (
        f"val_loss {metrics['val_loss']:.3f}: not {LEARNED} below an untrained model's ln V = {untrained:.3f}")


def run_eval(overrides: list[str]) -> dict:
    """eval.py in-process (``ckpt_path=`` among the overrides); returns what it reports."""
    from genlab.evaluate import evaluate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return evaluate(compose("eval", overrides=["accelerator=cpu", *overrides]))


def run_training(run_dir: Path, overrides: list[str]) -> dict:
    """Train in-process and return metrics.json."""
    cfg = compose_config(overrides, run_dir)
    train(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


class SendSignal(L.Callback):
    """Fault injection: this process sends itself ``signum`` (as ``kill`` would) at the ``at``-th
    batch of ``where``: "train", "validation" or "test". Added with
    ``+callbacks.kill._target_=conftest.SendSignal +callbacks.kill.where=validation``."""

    def __init__(self, where: str, signum: int = signal.SIGTERM, at: int = 1):
        self.where, self.signum, self.at, self.seen = where, int(signum), at, 0

    def _batch(self, where: str) -> None:
        if where == self.where:
            self.seen += 1
            if self.seen == self.at:
                signal.raise_signal(self.signum)

    def on_train_batch_end(self, *args):
        self._batch("train")

    def on_validation_batch_end(self, *args):
        self._batch("validation")

    def on_test_batch_end(self, *args):
        self._batch("test")


class SignalInJob(SendSignal):
    """``SendSignal`` in one sweep job only: the one numbered ``$GENLAB_TEST_SIGNAL_JOB`` (none when
    unset), so that the same sweep command, run again without the variable, runs undisturbed."""

    def setup(self, trainer, pl_module, stage):
        job = os.environ.get("GENLAB_TEST_SIGNAL_JOB")
        self.armed = job is not None and Path(trainer.default_root_dir).name.split("-", 1)[0] == job

    def _batch(self, where: str) -> None:
        if self.armed:
            super()._batch(where)


class FailAt(L.Callback):
    """Fault injection: an OSError (a full disk) at the first training batch."""

    def on_train_batch_start(self, *args):
        raise OSError(28, "No space left on device")


class ImageFile(NamedTuple):
    size: tuple[int, int]
    format: str
    frames: int


def image_file(path: Path) -> ImageFile:
    """An image file's size, format and frame count, its file closed again (``Image.open`` keeps it
    open until the image is closed)."""
    with Image.open(path) as image:
        return ImageFile(image.size, image.format, getattr(image, "n_frames", 1))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing changed on disk."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

def hparams_of(run_dir: Path) -> tuple[dict, dict]:
    """What TensorBoard's HPARAMS tab shows for a run: its hyper-parameters and the loss/ metrics."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0},
                              purge_orphaned_data=False).Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}
    # the value logged at the last step (event files of a run are not read in the order written)
    metrics = {tag: max(events.Scalars(tag), key=lambda e: (e.step, e.wall_time)).value
               for tag in events.Tags()["scalars"] if tag.startswith("loss/")}
    return hparams, metrics
