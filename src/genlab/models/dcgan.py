"""DCGAN (Radford et al. 2015) on 64x64 faces, as in the notebook: a generator of transposed
convolutions (BatchNorm, ReLU, tanh at the end) from a noise vector z, a discriminator of strided
convolutions (LeakyReLU 0.2, BatchNorm) down to one real/fake score, each trained by Adam.

One training step is one batch of real images: one discriminator update (a real and a fake
batch), then one generator update. ``trainer.max_steps`` and checkpoint intervals count these
steps (batches), not the two optimizer updates inside each.

What a run shows: Loss_D, Loss_G, D(x), and D(G(z)) before and after the generator update in
TensorBoard, and the pictures every image model shows (``genlab.models.image``): real images, grids
from one fixed noise batch every ``grid_every`` steps, ``progress.gif`` and ``losses.png``."""

from __future__ import annotations

import math

import hydra
import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import ConfigError
from genlab.models.image import ImageModel


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


class DCGAN(ImageModel):
    def __init__(self, image_size: int = 64, nz: int = 100, ngf: int = 64, ndf: int = 64,
                 optimizer: dict | None = None, grid_every: int = 500, grid_size: int = 64,
                 seed: int = 0):
        super().__init__(image_size, grid_every, grid_size, seed)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.latent_shape = (nz, 1, 1)
        self.generator = Generator(image_size, nz, ngf)
        self.discriminator = Discriminator(image_size, ndf)
        self.apply(init_weights)
        self.fix_noise()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def compiled_modules(self):
        return [self.generator, self.discriminator]

    def configure_optimizers(self):
        make = hydra.utils.instantiate(self.hparams.optimizer or {"_target_": "torch.optim.Adam", "_partial_": True,
                                                                  "lr": 2e-4, "betas": [0.5, 0.999]})
        return make(params=self.discriminator.parameters()), make(params=self.generator.parameters())

    def training_step(self, real: torch.Tensor, batch_idx: int):
        with self.one_update():  # one step: a discriminator update, then a generator update
            d_optimizer, g_optimizer = self.optimizers()
            ones = torch.ones(real.shape[0], device=self.device)
            fake = self.generator(self.noise(real.shape[0]))

            # discriminator: real images -> 1, generated images -> 0 (no gradient into the generator)
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(fake.detach())
            loss_d = (F.binary_cross_entropy_with_logits(real_logits, ones)
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(ones)))
            self.update(d_optimizer, loss_d, clip=self.loop.grad_clip)

            # generator: make the updated discriminator call its images real
            fake_logits_after = self.discriminator(fake)
            loss_g = F.binary_cross_entropy_with_logits(fake_logits_after, ones)
            self.update(g_optimizer, loss_g, clip=self.loop.grad_clip)

        self.record(real.shape[0], loss_d=loss_d.detach(), loss_g=loss_g.detach())
        self.log_dict({"loss/discriminator": loss_d.detach(), "loss/generator": loss_g.detach(),
                       # the discriminator's mean probability "real" for real, fake (before and after its update)
                       "probability/real": torch.sigmoid(real_logits.detach()).mean(),
                       "probability/fake_before": torch.sigmoid(fake_logits.detach()).mean(),
                       "probability/fake_after": torch.sigmoid(fake_logits_after.detach()).mean()})
