"""Shared fixtures: small data the tests make themselves, and a helper that trains through the
same code path as ``python train.py`` (Hydra compose + ``genlab.cli.train.train``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
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
from genlab.data.fetch import RemoteFile, fetch
from genlab.data.names import ITALIAN_NAMES
from genlab.data.text import DIVINA, SHAKESPEARE
from genlab.data.tokenizer import GPT2_ENCODER_JSON_SHA256, GPT2_VOCAB_BPE_SHA256
from genlab.errors import DataError
from genlab.cli.train import CONF_DIR, train

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIRROR = os.environ.get("GENLAB_DATA_MIRROR") or (str(SHARED_DATA) if SHARED_DATA.exists() else None)


def pytest_configure(config):
    """pytest resets the warning filters for each test: add those genlab sets for its users."""
    for message in SILENCED_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


# the GPT-2 BPE files where tiktoken downloads them, pinned as genlab checks the mirror's copies
GPT2_FILES = [RemoteFile(f"gpt2/{name}", f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}", sha)
              for name, sha in (("vocab.bpe", GPT2_VOCAB_BPE_SHA256), ("encoder.json", GPT2_ENCODER_JSON_SHA256))]


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> str:
    """A folder laid out as the data mirror holding the real data sets: the mirror itself where
    there is one (``GENLAB_DATA_MIRROR``, or ``../shared/data`` beside the checkout, as the Makefile
    and CI set it), else the public sources fetched once by genlab's own ``fetch`` (whose cache is
    laid out as a mirror). Without either, the tests that need them skip, saying why."""
    if MIRROR and Path(MIRROR).exists():
        return MIRROR
    folder = tmp_path_factory.mktemp("public-data")
    try:
        for remote in (ITALIAN_NAMES, DIVINA, SHAKESPEARE, *GPT2_FILES):
            fetch(remote, folder)
    except DataError as err:
        pytest.skip(f"needs the real data sets: no data mirror (GENLAB_DATA_MIRROR or ../shared/data) and their "
                    f"public source cannot be reached ({next(l for l in str(err).splitlines() if 'download:' in l).strip()})")
    return str(folder)


@pytest.fixture
def mirror(real_data, monkeypatch) -> str:
    """The real data as a mirror folder (``real_data``), also named by ``GENLAB_DATA_MIRROR`` for
    the runs a test composes (``paths.data_mirror`` defaults to it)."""
    monkeypatch.setenv("GENLAB_DATA_MIRROR", real_data)
    return real_data


def mount_namespace_refused() -> str | None:
    """Why this process cannot mount a filesystem of its own, or None: as root it can; otherwise an
    unprivileged user and mount namespace (``unshare -rm``) may be allowed by the kernel."""
    if os.geteuid() == 0:
        return None
    try:
        tried = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare -rm: {err}"
    return None if tried.returncode == 0 else f"unshare -rm: {tried.stderr.strip() or tried.returncode}"


def run_in_a_mount_namespace(request, needs: str) -> bool:
    """For a test that mounts (``needs`` says what for): True when it is not root and will run again
    in a child pytest as root of an unprivileged mount namespace (``pytest_pyfunc_call`` below), so
    the fixture must not mount here; False as root; a skip, with the reason, where neither works."""
    if os.geteuid() == 0:
        return False
    if (refused := mount_namespace_refused()) is not None:
        pytest.skip(f"needs {needs}: not root, and no unprivileged mount namespace ({refused})")
    request.node.in_namespace = True
    return True


@pytest.fixture
def small_disk(request, tmp_path):
    """A filesystem of its own (a 32 MiB tmpfs), so that filling it touches nothing else. As root
    the test mounts it; otherwise the test runs again in a child pytest inside an unprivileged
    user and mount namespace (``unshare -rm``, where the kernel allows it), where it is root, and
    passes or fails with the child (``pytest_pyfunc_call`` below); where neither works it skips."""
    if run_in_a_mount_namespace(request, "a small filesystem of its own"):
        yield None
        return
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.fail(f"this test fills a small filesystem of its own, and mounting a tmpfs at {disk} failed "
                    f"({mounted.stderr.strip() or mounted.returncode})")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test that mounts (``small_disk``, a read-only view) and is not root: run it in a child pytest as root of a mount namespace."""
    if not getattr(pyfuncitem, "in_namespace", False):
        return None
    basetemp = Path(pyfuncitem.funcargs["tmp_path"]) / "namespace"
    child = subprocess.run(["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--basetemp={basetemp}", "-m", "", pyfuncitem.nodeid], cwd=REPO, capture_output=True,
                           text=True)
    if child.returncode != 0:
        pytest.fail(f"in a mount namespace (unshare -rm) the test failed:\n{child.stdout[-4000:]}{child.stderr[-2000:]}")
    return True


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


def training_loop(rank: int = 0, world: int = 1):
    """What a training stream asks a data module's trainer for (``genlab.data.batches.BatchStream``),
    without a trainer: a data module, or the ``loop`` of a stream looked at on its own."""
    trainer = SimpleNamespace(global_step=0, global_rank=rank, world_size=world, overfit_batches=0)
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
# Their losses do not depend on the machine: they fix loop.updates_per_step.
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
    from genlab.cli.evaluate import evaluate

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
