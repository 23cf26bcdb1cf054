"""The insight callback: when to look inside the model, and what it saw (the pictures are drawn by
the modules beside this one; see the package's docstring)."""

from __future__ import annotations

import contextlib
import itertools
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
from genlab.steps import next_due_update


def after_update(optimizer, nth: int, action):
    """Call ``action()`` right after the ``nth`` (1, 2, ...) step of ``optimizer`` from now; returns
    the hook's handle, to remove once the Lightning step is over."""
    calls = itertools.count(1)

    def hook(opt, args, kwargs):
        if next(calls) == nth:
            action()
    return optimizer.register_step_post_hook(hook)


class Insight(L.Callback):
    def __init__(self, every_n_steps: int = 1000, loss_window: int | None = None, histograms: bool = True):
        self.every_n_steps = every_n_steps
        self.loss_window = loss_window  # None: about 1/50 of the run, at least 1
        self.histograms = histograms
        self.train_losses: list[tuple[int, float]] = []  # (update, loss)
        self.val_losses: list[tuple[int, float]] = []
        self.update_ratios = UpdateRatios(self.timed)  # every model with an optimizer, the GAN's two too
        self.probe: ActivationProbe | None = None
        self._activations_hook = None
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

    # --- per Lightning step: update ratios and activations at the due update, every update's loss ---
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with self.timed():
            self.update_ratios.arm(trainer, pl_module, self.every_n_steps)
            due = next_due_update(trainer, self.every_n_steps) if self.probe is not None else None
            if due is not None:  # measured right after that update, whichever of the step's updates it is
                self._activations_hook = after_update(trainer.optimizers[0], due - trainer.global_step,
                                                      lambda: self.look_at_activations(trainer, pl_module, due))

    def look_at_activations(self, trainer, pl_module, update: int) -> None:
        with self.timed():
            tb = tensorboard(trainer) if trainer.is_global_zero else None
            log_activations(self.probe.measure(pl_module), pl_module, tb, update, self.histograms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.timed():
            self.update_ratios.disarm()
            if self._activations_hook is not None:
                self._activations_hook.remove()
                self._activations_hook = None
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
