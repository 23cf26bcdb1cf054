"""DCGAN (Radford et al. 2015) on 64x64 faces, as in the notebook: a generator of transposed
convolutions (BatchNorm, ReLU, tanh at the end) from a noise vector z, a discriminator of strided
convolutions (LeakyReLU 0.2, BatchNorm) down to one real/fake score, each trained by Adam.

One training step is one batch of real images: one discriminator update (a real and a fake
batch), then one generator update. ``trainer.max_steps`` and checkpoint intervals count these
steps (batches), not the two optimizer updates inside each.

What a run shows: Loss_D, Loss_G, D(x), and D(G(z)) before and after the generator update in
TensorBoard; every ``grid_every`` steps a grid of the generator's images from one fixed noise batch
(TensorBoard and ``grids/step_XXXXXXX.png``); a grid of real images at the start; at the end
``progress.gif`` (the grids in order) and ``losses.png``."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError, TrainingDiverged
from genlab.figures import image_grid, plot_curves, save_gif, save_png
from genlab.models.module import GenlabModule


def n_levels(image_size: int) -> int:
    """Resolution doublings from the 4x4 seed to the image: 64 -> 4 (4, 8, 16, 32, 64)."""
    levels = math.log2(image_size / 4)
    if image_size < 8 or levels != int(levels):
        raise ConfigError(f"the DCGAN makes square images of 8, 16, 32, 64, 128, ... pixels; "
                          f"data.image_size={image_size} is not one of them")
    return int(levels)


class Generator(nn.Sequential):
    """(N, nz, 1, 1) noise -> (N, 3, S, S) images in [-1, 1]; channels halve as the size doubles."""

    def __init__(self, image_size: int, nz: int, ngf: int):
        levels = n_levels(image_size)
        channels = [ngf * 2 ** i for i in reversed(range(levels))]  # 64 px: 512, 256, 128, 64
        layers = [nn.ConvTranspose2d(nz, channels[0], 4, 1, 0, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], 3, 4, 2, 1, bias=False), nn.Tanh()]
        super().__init__(*layers)


class Discriminator(nn.Sequential):
    """(N, 3, S, S) images -> (N,) logits of "real". The notebook ends in a sigmoid and uses BCELoss;
    here the sigmoid is part of the loss (``binary_cross_entropy_with_logits``): the same model,
    numerically stable, and allowed under mixed precision."""

    def __init__(self, image_size: int, ndf: int):
        levels = n_levels(image_size)
        channels = [ndf * 2 ** i for i in range(levels)]  # 64 px: 64, 128, 256, 512
        layers = [nn.Conv2d(3, channels[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(channels[-1], 1, 4, 1, 0, bias=False), nn.Flatten(0)]
        super().__init__(*layers)


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: convolutions N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(GenlabModule):
    kind = "image"

    def __init__(self, image_size: int = 64, nz: int = 100, ngf: int = 64, ndf: int = 64,
                 optimizer: dict | None = None, grid_every: int = 500, grid_size: int = 64,
                 seed: int = 0, compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(image_size, nz, ngf)
        self.discriminator = Discriminator(image_size, ndf)
        self.apply(init_weights)
        # one noise batch, fixed for the whole run (and kept in checkpoints), to watch progress on
        self.register_buffer("fixed_noise", self.noise(grid_size, torch.Generator().manual_seed(seed)))
        self.history: list[tuple[int, float, float]] = []  # (step, Loss_D, Loss_G) for losses.png
        self.images_seen = 0

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.hparams.nz, 1, 1, generator=generator, device=self.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def compiled_modules(self):
        return [self.generator, self.discriminator]

    def configure_optimizers(self):
        make = hydra.utils.instantiate(self.hparams.optimizer or {"_target_": "torch.optim.Adam", "_partial_": True,
                                                                  "lr": 2e-4, "betas": [0.5, 0.999]})
        return make(params=self.discriminator.parameters()), make(params=self.generator.parameters())

    def setup(self, stage: str) -> None:
        if self.trainer.precision == "16-mixed":
            raise ConfigError("model=dcgan trains in 32-true or bf16-mixed precision, not 16-mixed (its two "
                              "optimizers would each need a gradient scaler); set trainer.precision=bf16-mixed")

    # --- training ------------------------------------------------------------------------------
    def training_step(self, real: torch.Tensor, batch_idx: int):
        d_optimizer, g_optimizer = self.optimizers()
        if self.global_step == 0 and batch_idx == 0:
            self.show("real_images", image_grid(real[:64]), Path("real_images.png"))
        ones = torch.ones(real.shape[0], device=self.device)
        fake = self.generator(self.noise(real.shape[0]))

        # discriminator: real images -> 1, generated images -> 0 (no gradient into the generator)
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(real_logits, ones)
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(ones)))
        self.update(d_optimizer, loss_d, count=False)

        # generator: make the updated discriminator call its images real
        fake_logits_after = self.discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(fake_logits_after, ones)
        self.update(g_optimizer, loss_g)  # counts the step: one batch
        loss_d, loss_g = loss_d.detach(), loss_g.detach()

        if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
            raise TrainingDiverged(f"the GAN's losses became {loss_d.item()} / {loss_g.item()} at step "
                                   f"{self.global_step}; lower the learning rate (model.optimizer.lr)", step=self.global_step)
        self.images_seen += real.shape[0]
        values = {"gan/loss_d": loss_d, "gan/loss_g": loss_g,
                  "gan/d_x": torch.sigmoid(real_logits.detach()).mean(),
                  "gan/d_g_z_before": torch.sigmoid(fake_logits.detach()).mean(),
                  "gan/d_g_z_after": torch.sigmoid(fake_logits_after.detach()).mean()}
        self.log_dict(values)
        self.log_dict({"loss_d": values["gan/loss_d"], "loss_g": values["gan/loss_g"]}, prog_bar=True, logger=False)
        self.log("step", float(self.global_step))
        self.log_rate("perf/images_per_second", self.images_seen)
        self.history.append((self.global_step, loss_d.item(), loss_g.item()))
        if self.global_step % self.hparams.grid_every == 0 or self.global_step == 1:
            self.show_progress()

    # --- pictures ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images for noise ``z`` in eval mode (BatchNorm's running statistics), as sampling does."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(z)
        finally:
            self.generator.train(was_training)

    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def show(self, tag: str, grid: torch.Tensor, relative_path: Path) -> None:
        """A grid to TensorBoard and to a PNG in the run folder (rank 0 only)."""
        if not self.trainer.is_global_zero:
            return
        save_png(grid, self.run_dir() / relative_path)
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image(tag, grid, self.global_step)

    def show_progress(self) -> None:
        grid = image_grid(self.generate(self.fixed_noise))
        self.show("fixed_noise", grid, Path("grids") / f"step_{self.global_step:07d}.png")

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        frame = self.run_dir() / "grids" / f"step_{self.global_step:07d}.png"
        if not frame.exists():
            self.show_progress()
        frames = sorted((self.run_dir() / "grids").glob("step_*.png"))
        save_gif(frames, self.run_dir() / "progress.gif")
        if self.history:
            steps, loss_d, loss_g = zip(*self.history)
            plot_curves({"Loss_D": (steps, loss_d), "Loss_G": (steps, loss_g)}, self.run_dir() / "losses.png",
                        title="Generator and discriminator loss during training")

    def summary(self) -> dict:
        """The last 50 steps' mean losses, for metrics.json."""
        recent = self.history[-50:]
        if not recent:
            return {}
        return {"loss_d": sum(h[1] for h in recent) / len(recent), "loss_g": sum(h[2] for h in recent) / len(recent)}

    def checkpoint_extras(self) -> dict:
        return {"history": self.history}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.history = list(checkpoint.get("genlab", {}).get("history") or [])
