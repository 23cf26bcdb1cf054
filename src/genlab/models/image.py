"""The shared base of every image model: a latent vector z -> (N, 3, S, S) images in [-1, 1].

A subclass (``dcgan.py``; a VAE would be another) builds its networks, then calls
``fix_noise()``, and defines:

- ``latent_shape``: the shape of one latent vector, e.g. ``(100, 1, 1)``;
- ``decode(z)``: images for latent vectors ``z`` (the generator, a VAE's decoder);
- ``training_step``, which calls ``record(batch_size, loss_name=value, ...)`` once per step.

This base does the rest, the same for every image model: the latent prior ``noise()`` (standard
normal), ``generate(z)`` in eval mode (what ``sample.py`` calls, with interpolations between two
noise vectors), the loss history (``losses.png`` and ``metrics.json``'s final figures, kept in
checkpoints), a stop at a NaN loss (naming its step, before any checkpoint holds it), images/s,
and the pictures a run shows: a grid of real images at the start, every ``grid_every`` steps a grid
from one fixed noise batch (TensorBoard and ``grids/step_XXXXXXX.png``), and ``progress.gif`` at
the end.

Where the run has a quality measure (``genlab.results.quality``: the extractor's weights could be had),
every validation (``val_every`` and the end) generates images from its fixed noise set and logs
FID and KID (``quality/fid``, ``quality/kid``); the best FID's checkpoint is ``best.ckpt``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from genlab.errors import TrainingDiverged
from genlab.results.figures import image_grid, plot_curves, save_gif, save_png
from genlab.models.module import GenlabModule
from genlab.results.quality import ImageQuality


class ImageModel(GenlabModule):
    kind = "image"
    latent_shape: tuple[int, ...] = ()
    # steps between readings of the losses: reading a number off a GPU waits for all its queued work;
    # done every step, that leaves the GPU idle while the CPU prepares the next step
    READ_LOSSES_EVERY = 25

    def __init__(self, image_size: int, grid_every: int = 500, grid_size: int = 64, seed: int = 0):
        super().__init__()
        self.image_size, self.grid_every, self.grid_size, self.seed = image_size, grid_every, grid_size, seed
        self.history: list[dict] = []  # one entry a step: {"step": n, <loss name>: value, ...}
        self.unread: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, losses) not yet in history
        self.images_seen = 0
        self.quality: ImageQuality | None = None  # set by train.py where FID can be measured
        self.best_fid = math.inf  # the lowest FID so far (kept in checkpoints)
        self.scores: dict[str, float] = {}  # the last validation's FID and KID
        self._fake: list[torch.Tensor] = []  # features of this validation's generated images

    def fix_noise(self) -> None:
        """One noise batch, fixed for the whole run (and kept in checkpoints), to watch progress on;
        call at the end of ``__init__``, once ``latent_shape`` is known."""
        self.register_buffer("fixed_noise", self.noise(self.grid_size, torch.Generator().manual_seed(self.seed)))

    # --- what a subclass defines -------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- sampling ----------------------------------------------------------------------------------
    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, *self.latent_shape, generator=generator, device=self.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images for noise ``z`` in eval mode (BatchNorm's running statistics), as sampling does."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(z)
        finally:
            self.train(was_training)

    # --- training ----------------------------------------------------------------------------------
    def record(self, batch_size: int, **losses: torch.Tensor) -> None:
        """Once per training step: the step's losses (history, progress bar) and its images. The
        losses stay on the device until ``read_losses``, every ``READ_LOSSES_EVERY`` steps."""
        self.images_seen += batch_size
        self.unread.append((self.global_step, losses))
        self.log_dict(losses, prog_bar=True, logger=False)
        self.log("step", float(self.global_step))
        self.log_rate("perf/images_per_second", self.images_seen)
        if len(self.unread) >= self.READ_LOSSES_EVERY:
            self.read_losses()

    def read_losses(self) -> None:
        """The recorded losses into ``history``, with one wait for the device; a NaN or infinite loss
        stops the run, naming the first step that had one. Called before anything reads the history,
        and before a checkpoint is written, so that no checkpoint holds a diverged model."""
        if not self.unread:
            return
        unread, self.unread = self.unread, []
        values = torch.stack([torch.stack(list(losses.values())) for _, losses in unread]).float().tolist()
        for (step, losses), row in zip(unread, values):
            if not all(math.isfinite(v) for v in row):
                shown = " / ".join(f"{name} {v}" for name, v in zip(losses, row))
                raise TrainingDiverged(f"the losses became {shown} at step {step}; lower the learning rate "
                                       "(model.optimizer.lr)", step=step)
            self.history.append({"step": step, **dict(zip(losses, row))})

    def summary(self) -> dict:
        """The last 50 steps' mean of each loss, for metrics.json."""
        self.read_losses()
        recent = self.history[-50:]
        names = [k for k in recent[0] if k != "step"] if recent else []
        return {name: sum(h[name] for h in recent) / len(recent) for name in names}

    # --- pictures ----------------------------------------------------------------------------------
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
        self.show("samples/fixed_noise", grid, Path("grids") / f"step_{self.global_step:07d}.png")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == 0 and batch_idx == 0:
            self.show("samples/real_images", image_grid(batch[:64]), Path("real_images.png"))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step % self.grid_every == 0 or self.global_step == 1:
            self.show_progress()

    def on_train_end(self) -> None:
        self.read_losses()
        if not self.trainer.is_global_zero:
            return
        if not (self.run_dir() / "grids" / f"step_{self.global_step:07d}.png").exists():
            self.show_progress()
        save_gif(sorted((self.run_dir() / "grids").glob("step_*.png")), self.run_dir() / "progress.gif")
        if self.history:
            steps = [h["step"] for h in self.history]
            curves = {name: (steps, [h[name] for h in self.history]) for name in self.history[0] if name != "step"}
            plot_curves(curves, self.run_dir() / "losses.png", title="Losses during training")

    # --- quality: FID and KID at every validation -------------------------------------------------
    @property
    def monitor(self) -> str | None:
        return "quality/fid" if self.quality is not None else None

    def validation_step(self, z: torch.Tensor, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:  # Lightning's check before training: the step runs, no more
            self._fake.append(self.quality.features(self.generate(z)))

    def on_validation_epoch_end(self) -> None:
        if not self._fake:
            return
        fake, self._fake = torch.cat(self._fake), []
        self.scores = self.quality.score(fake)
        self.best_fid = min(self.best_fid, self.scores["fid"])
        self.log_dict({"quality/fid": self.scores["fid"], "quality/kid": self.scores["kid_mean"],
                       "quality/best_fid": self.best_fid})
        self.log("step", float(self.global_step))

    def quality_summary(self) -> dict:
        """The last validation's FID and KID for metrics.json (nothing without a quality measure)."""
        if self.quality is None or not self.scores:
            return {}
        return {**self.scores, "best_fid": self.best_fid, "fid_images": self.quality.fake_count,
                "fid_real_images": self.quality.real_count}

    # --- checkpoints -------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        self.read_losses()
        return {"history": self.history, "best_fid": self.best_fid}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.history = [h for h in checkpoint.get("genlab", {}).get("history") or [] if isinstance(h, dict)]
        self.best_fid = checkpoint.get("genlab", {}).get("best_fid", math.inf)
        self.unread = []
