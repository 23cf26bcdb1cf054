"""The insight callback: when to look inside the model, and what it saw (the pictures are drawn by
the modules beside this one; see the package's docstring)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from genlab.insight.activations import ActivationProbe, activation_figure, log_activations
from genlab.insight.bigram import bigram_figures
from genlab.insight.board import tensorboard
from genlab.insight.embedding import embedding_figure
from genlab.insight.losses import loss_figure
from genlab.insight.update_ratio import UpdateRatios
from genlab.models.base import LanguageModel
from genlab.loop.steps import UpdateHook


class Insight(L.Callback, UpdateHook):
    def __init__(self, every_n_steps: int = 1000, loss_window: int | None = None, histograms: bool = True):
        self.every_n_updates = every_n_steps  # the loop calls before_update and after_update at these
        self.loss_window = loss_window  # None: about 1/50 of the run, at least 1
        self.histograms = histograms
        self.train_losses: list[tuple[int, float]] = []  # (update, loss)
        self.val_losses: list[tuple[int, float]] = []
        self.update_ratios = UpdateRatios()  # every model with an optimizer, the GAN's two too
        self.probe: ActivationProbe | None = None
        self.seconds = 0.0  # time spent in this callback during training (scripts/benchmark.py reports it)

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def on_train_start(self, trainer, pl_module):
        if isinstance(pl_module, LanguageModel) and pl_module.tanh_layers():
            x, y = next(iter(trainer.datamodule.val_dataloader()))  # a fixed batch to look at activations
            self.probe = ActivationProbe(x[:64].to(pl_module.device), y[:64] >= 0)

    # --- at every due update: update ratios and activations; after every Lightning step its losses ---
    def before_update(self, trainer, module, update: int) -> None:
        with self.timed():
            self.update_ratios.before(trainer, module)

    def after_update(self, trainer, module, update: int) -> None:
        with self.timed():
            tb = tensorboard(trainer) if trainer.is_global_zero else None
            self.update_ratios.after(trainer, module, update, tb)
            if self.probe is not None:
                log_activations(self.probe.measure(module), module, tb, update, self.histograms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.timed():
            after = trainer.global_step
            losses = pl_module.step_losses if isinstance(pl_module, LanguageModel) else []
            if losses:
                self.train_losses += zip(range(after - len(losses) + 1, after + 1), torch.stack(losses).float().tolist())

    def on_validation_end(self, trainer, pl_module):
        if "loss/val" in trainer.callback_metrics and not trainer.sanity_checking:
            self.val_losses.append((trainer.global_step, float(trainer.callback_metrics["loss/val"])))

    # --- the figures at the end ----------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        out, tb, step = Path(trainer.default_root_dir) / "insight", tensorboard(trainer), trainer.global_step
        figures = [loss_figure(self.train_losses, self.val_losses, self.loss_window, out), self.update_ratios.figure(out)]
        if isinstance(pl_module, LanguageModel):
            if self.probe is not None:
                figures.append(activation_figure(self.probe.measure(pl_module), out))
            figures += [embedding_figure(pl_module, out, tb, step), *bigram_figures(pl_module, out)]
        if tb is not None:
            for path in filter(None, figures):
                pixels = np.asarray(Image.open(path).convert("RGB"))
                tb.add_image(f"network/{path.stem}", pixels, step, dataformats="HWC")
