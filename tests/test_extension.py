"""Adding a model is one class (plus, for the command line, one YAML in conf/model/): a minimal
language model and a minimal image model, defined in this file and nowhere else, train, checkpoint,
resume and sample through the entry points of the real models (``train`` and ``sample``, what
``train.py`` and ``sample.py`` call). See docs/adding_a_model.md."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_learned, compose_config, image_file
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torch import nn

from genlab.run.checkpoints import read_checkpoint
from genlab.errors import CheckpointError
from genlab.models.base import LanguageModel
from genlab.models.image import ImageModel
from genlab.cli.sample import sample
from genlab.schedules import warmup_cosine
from genlab.loop.steps import UpdateHook
from genlab.cli.train import CONF_DIR, train


class TinyLM(LanguageModel):
    """A bigram network: each token's embedding, mapped to the next token's logits."""

    def __init__(self, n_embd: int = 8, **base):
        super().__init__(**base)
        self.block_size = 1
        self.embedding = nn.Embedding(self.vocab_size, n_embd)
        self.head = nn.Linear(n_embd, self.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(idx))


class TinyVAE(ImageModel):
    """A variational autoencoder: a linear encoder to a Gaussian over z, a linear decoder."""

    def __init__(self, image_size: int, nz: int = 4, optimizer: dict | None = None, scheduler: dict | None = None,
                 grid_every: int = 2, grid_size: int = 4, seed: int = 0):
        super().__init__(image_size, grid_every, grid_size, seed)
        self.save_hyperparameters()
        self.latent_shape = (nz,)
        pixels = 3 * image_size * image_size
        self.encoder = nn.Linear(pixels, 2 * nz)
        self.decoder = nn.Linear(nz, pixels)
        self.fix_noise()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.hparams.image_size
        return torch.tanh(self.decoder(z)).view(-1, 3, size, size)

    def training_step(self, images: torch.Tensor, batch_idx: int):
        mean, log_var = self.encoder(images.flatten(1)).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()  # the reparameterisation trick
        reconstruction = F.mse_loss(self.decode(z), images)
        kl = -0.5 * torch.mean(1 + log_var - mean.pow(2) - log_var.exp())
        self.record(images.shape[0], reconstruction=reconstruction.detach(), kl=kl.detach())
        return reconstruction + kl


def train_model(model: dict, run_dir, overrides: list[str]) -> dict:
    """``python train.py`` with a model config that names a class outside the package."""
    cfg = compose_config([*overrides, "num_samples=3"], run_dir)
    with open_dict(cfg):
        cfg.model = OmegaConf.create(model)
    train(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def sample_from(run_dir, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return sample(compose("sample", overrides=[f"ckpt_path={run_dir}", *overrides]))


def test_sampling_a_model_of_ones_own_needs_its_class_named(names_file, tmp_path):
    """genlab imports no class that a checkpoint names: the user names their own (model_class=)."""
    run_dir = tmp_path / "run"
    train_model({"_target_": "test_extension.TinyLM"}, run_dir,
                [f"data.path={names_file}", "loop.updates_per_step=10", "val_every=10", "trainer.max_steps=10"])
    with pytest.raises(CheckpointError, match=r"'test_extension\.TinyLM', which is not one of genlab's models"):
        sample_from(run_dir)
    assert len(sample_from(run_dir, "num_samples=2", "model_class=test_extension.TinyLM")) == 2


def test_a_language_model_defined_outside_the_package(names_file, tmp_path):
    run_dir, model = tmp_path / "run", {"_target_": "test_extension.TinyLM", "n_embd": 8}
    data = [f"data.path={names_file}", "loop.updates_per_step=10", "val_every=20", "optimizer.lr=0.03"]
    first = train_model(model, run_dir, [*data, "trainer.max_steps=20"])
    assert first["status"] == "completed"
    assert_learned(first, run_dir)
    resumed = train_model(model, run_dir, [*data, "trainer.max_steps=40", f"ckpt_path={run_dir}"])
    assert resumed["steps"] == 40 and read_checkpoint(run_dir)["global_step"] == 40
    assert len((run_dir / "samples.txt").read_text().splitlines()) == 3
    names = sample_from(run_dir, "num_samples=5", "prompt=a", "model_class=test_extension.TinyLM")
    assert len(names) == 5 and all(n.startswith("a") for n in names)


def test_an_image_model_defined_outside_the_package(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(8):
        pixels = torch.randint(0, 256, (20, 20, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(faces / f"{i}.png")
    run_dir, model = tmp_path / "run", {"_target_": "test_extension.TinyVAE", "nz": 4}
    data = ["data=celeba", f"data.root={faces}", "data.image_size=8", "data.batch_size=4", "data.num_workers=0",
            "val_every=2"]
    first = train_model(model, run_dir, [*data, "trainer.max_steps=2"])
    assert first["status"] == "completed" and set(first) >= {"reconstruction", "kl", "images_per_second"}
    resumed = train_model(model, run_dir, [*data, "trainer.max_steps=4", f"ckpt_path={run_dir}"])
    assert resumed["steps"] == 4 and len(read_checkpoint(run_dir)["genlab"]["history"]) == 4
    assert (run_dir / "progress.gif").exists() and (run_dir / "losses.png").exists()
    grid = sample_from(run_dir, "num_samples=6", "interpolate=true", "model_class=test_extension.TinyVAE")
    assert image_file(grid).size == (2 + 6 * 10, 2 + 1 * 10)  # six 8-pixel images in a row


class RecordRates(L.Callback, UpdateHook):
    """The learning rate each update is made with, by update number (the loop calls it around every update)."""

    seen: dict[int, float] = {}

    def before_update(self, trainer, module, update):
        RecordRates.seen[update] = trainer.optimizers[0].param_groups[0]["lr"]


def test_an_automatic_optimization_model_gets_its_schedule_stepped_every_update(tmp_path):
    """The guide's image model (automatic optimization) with scheduler=cosine: the rate moves at every
    update, as the schedule says, not once an epoch."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(faces / f"{i}.png")
    RecordRates.seen = {}
    overrides = ["data=celeba", f"data.root={faces}", "data.image_size=8", "data.batch_size=4", "data.num_workers=0",
                 "val_every=6", "trainer.max_steps=6", "scheduler=cosine", "scheduler.warmup_steps=2",
                 "optimizer.lr=0.01", "+callbacks.rates._target_=test_extension.RecordRates"]
    metrics = train_model({"_target_": "test_extension.TinyVAE", "nz": 4}, tmp_path / "run", overrides)
    assert metrics["status"] == "completed" and metrics["steps"] == 6
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule, expected = warmup_cosine(optimizer, warmup_steps=2, total_steps=6), []
    for _ in range(6):  # the rate of each update, as a plain loop steps the schedule
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    rates = [RecordRates.seen[u] for u in range(1, 7)]
    assert rates == pytest.approx(expected)
    # a new rate at every update but the peak, which the schedule holds for two; stepped once an epoch
    # (here 8 images in batches of 4: two updates) each rate would last two updates
    assert len(set(rates)) == 5
