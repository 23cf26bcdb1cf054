"""The notebook's looks inside a model, made by every run (``callbacks.insight``): in TensorBoard
while training, and as PNG files in ``<run>/insight/`` at the end.

- ``loss_curves.png``: the training loss of every update, its mean over windows of updates (the
  notebook's ``view(-1, 1000).mean(1)``), and the validation loss on the same axes.
- ``update_ratio.png``: log10 of (update size / weight size), std over each weight matrix, every
  ``every_n_steps`` updates; the notebook's rule of thumb is about -3.
- ``activations.png``: for tanh layers (mlp, wavenet, rnn), the histograms of pre-activations and
  activations per layer at the end, with the share of saturated units (|tanh| > 0.97), which is
  also logged as ``insight/saturated/<layer>`` through training; measured in eval mode on 64
  validation names, at the positions that predict a real character.
- ``embedding.png``: the characters' embedding vectors in 2-D (PCA when wider); also TensorBoard's
  embedding projector with the characters as labels.
- ``bigram_counts.png``, ``bigram_probs.png``: the counting bigram's table, annotated.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

from genlab.figures import plot_curves, plt, save_figure

SATURATED = 0.97  # |tanh| above this passes almost no gradient: 1 - 0.97^2 = 0.06


def character_labels(model) -> list[str] | None:
    """One printable label per token id, for character vocabularies (None for BPE)."""
    tokenizer = model.hparams.get("tokenizer") or {}
    if tokenizer.get("type") != "char":
        return None
    return [{"\n": "\\n", " ": "␣"}.get(c, c) for c in tokenizer["chars"]]


def window_means(values: list[float], window: int) -> tuple[list[float], list[float]]:
    """Means of consecutive windows of ``window`` values, placed at each window's last index."""
    xs, ys = [], []
    for start in range(0, len(values) - window + 1, window):
        xs.append(start + window)
        ys.append(sum(values[start : start + window]) / window)
    return xs, ys


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the two principal components (the vectors as they are when D <= 2)."""
    if vectors.shape[1] <= 2:
        return torch.nn.functional.pad(vectors, (0, 2 - vectors.shape[1]))
    centred = vectors - vectors.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def add_histogram(tb, tag: str, values: torch.Tensor, step: int, bins: int = 60) -> None:
    """A TensorBoard histogram counted by torch. (``add_histogram`` counts with numpy, and on a
    small machine the training after each call ran about a tenth slower.)"""
    values = values.flatten().float()
    low, high = values.min().item(), values.max().item()
    counts = torch.histc(values, bins=bins, min=low, max=high)
    limits = torch.linspace(low, high, bins + 1)[1:]
    tb.add_histogram_raw(tag, min=low, max=high, num=values.numel(), sum=values.sum().item(),
                         sum_squares=values.pow(2).sum().item(), bucket_limits=limits.tolist(),
                         bucket_counts=counts.tolist(), global_step=step)


class Insight(L.Callback):
    def __init__(self, every_n_steps: int = 1000, loss_window: int | None = None, histograms: bool = True):
        self.every_n_steps = every_n_steps
        self.loss_window = loss_window  # None: about 1/50 of the run, at least 1
        self.histograms = histograms
        self.train_losses: list[tuple[int, float]] = []  # (update, loss)
        self.val_losses: list[tuple[int, float]] = []
        self.update_ratios: dict[str, list[tuple[int, float]]] = {}
        self.probe: torch.Tensor | None = None
        self.probe_targets: torch.Tensor | None = None
        self._hooks = []
        self.seconds = 0.0  # time spent in this callback during training (scripts/benchmark.py reports it)

    # --- bookkeeping ---------------------------------------------------------------------------
    def run_dir(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / "insight"

    def tensorboard(self, trainer):
        return next((lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_histogram")), None)

    def on_train_start(self, trainer, pl_module):
        if hasattr(pl_module, "tanh_layers") and pl_module.tanh_layers():
            x, y = next(iter(trainer.datamodule.val_dataloader()))  # a fixed batch to look at activations
            self.probe = x[:64].to(pl_module.device)
            self.probe_targets = y[:64] >= 0  # positions that predict a real character (not padding)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.write_figures(trainer, pl_module)

    # --- per update: losses and the update-to-data ratio -------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """When one of this step's updates is due (a multiple of ``every_n_steps``), hook the
        optimizers' ``step`` around that update; the other steps run without hooks."""
        with self.timed():
            self.arm(trainer, pl_module)

    def arm(self, trainer, pl_module) -> None:
        first = trainer.global_step + 1
        due = -(-first // self.every_n_steps) * self.every_n_steps
        if due < first + getattr(pl_module, "updates_per_step", 1):
            for optimizer in trainer.optimizers:
                self.measure_update(trainer, pl_module, optimizer, calls_before=due - first, step=due)

    def measure_update(self, trainer, pl_module, optimizer, calls_before: int, step: int) -> None:
        """log10(std(update) / std(weights)) of each weight matrix, for this optimizer's update
        after ``calls_before`` others: the real update, whatever the optimizer (SGD, Adam, ...)."""
        calls, before = itertools.count(), {}

        def snapshot(opt, args, kwargs):
            if next(calls) == calls_before:
                with self.timed():
                    before.update({n: p.detach().clone() for n, p in self.weights(pl_module, opt).items()})

        def compare(opt, args, kwargs):
            if not before:
                return
            with self.timed():
                tb = self.tensorboard(trainer) if trainer.is_global_zero else None
                for name, p in self.weights(pl_module, opt).items():
                    ratio = ((p.detach() - before[name]).std() / (before[name].std() + 1e-12)).item()
                    value = math.log10(ratio) if ratio > 0 else -10.0
                    self.update_ratios.setdefault(name, []).append((step, value))
                    if tb is not None:
                        tb.add_scalar(f"insight/update_ratio_log10/{name}", value, step)
                before.clear()

        self._hooks += [optimizer.register_step_pre_hook(snapshot), optimizer.register_step_post_hook(compare)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.timed():
            self.collect(trainer, pl_module)

    def collect(self, trainer, pl_module) -> None:
        """After a step: drop the optimizer hooks, keep the updates' losses, look at activations."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        losses = getattr(pl_module, "step_losses", None)
        after = trainer.global_step
        before = after - len(losses or [None])
        if losses:
            self.train_losses += zip(range(before + 1, after + 1), torch.stack(losses).float().tolist())
            pl_module.step_losses = []
        if self.probe is not None and after // self.every_n_steps > before // self.every_n_steps:
            self.log_activations(trainer, pl_module)

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def on_validation_end(self, trainer, pl_module):
        if "val/loss" in trainer.callback_metrics and not trainer.sanity_checking:
            self.val_losses.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    def weights(self, pl_module, optimizer) -> dict[str, torch.Tensor]:
        """The optimizer's weight matrices (2-D and up), by parameter name."""
        names = {id(p): n for n, p in pl_module.named_parameters()}
        return {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]
                if p.dim() >= 2 and id(p) in names}

    # --- activations -----------------------------------------------------------------------------
    @torch.no_grad()
    def activations(self, pl_module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Pre-activations and activations of each tanh layer on the probe batch, in eval mode."""
        seen, hooks = {}, []

        real = self.probe_targets

        def at_targets(t: torch.Tensor) -> torch.Tensor:
            """(B, L, C) -> (N, C): the positions that predict a real character. A layer's positions
            end where the sequence does (the WaveNet's lower levels also cover the start padding)."""
            return t.float().cpu()[:, -real.shape[1]:][real]

        def keep(name):
            def hook(module, inputs, output):
                if isinstance(module, nn.Tanh):
                    seen[name] = (at_targets(inputs[0]), at_targets(output))
                else:  # a vanilla RNN: its outputs are tanh(pre-activation)
                    out = at_targets(output[0])
                    seen[name] = (torch.atanh(out.clamp(-1 + 1e-6, 1 - 1e-6)), out)
            return hook

        for name, module in pl_module.tanh_layers().items():
            hooks.append(module.register_forward_hook(keep(name)))
        was_training = pl_module.training
        pl_module.eval()
        try:
            pl_module(self.probe)
        finally:
            pl_module.train(was_training)
            for hook in hooks:
                hook.remove()
        return seen

    def log_activations(self, trainer, pl_module) -> None:
        tb = self.tensorboard(trainer) if trainer.is_global_zero else None
        for name, (pre, post) in self.activations(pl_module).items():
            saturated = (post.abs() > SATURATED).float().mean().item()
            pl_module.log(f"insight/saturated/{name}", saturated)
            if tb is not None and self.histograms:
                add_histogram(tb, f"insight/preactivation/{name}", pre, trainer.global_step)
                add_histogram(tb, f"insight/activation/{name}", post, trainer.global_step)

    # --- the figures at the end ------------------------------------------------------------------
    def write_figures(self, trainer, pl_module) -> None:
        out, tb = self.run_dir(trainer), self.tensorboard(trainer)
        figures = [self.loss_figure(out), self.ratio_figure(out), self.activation_figure(pl_module, out),
                   self.embedding_figure(pl_module, out, tb, trainer.global_step), *self.bigram_figures(pl_module, out)]
        if tb is not None:
            for path in filter(None, figures):
                pixels = np.asarray(Image.open(path).convert("RGB"))
                tb.add_image(f"insight/{path.stem}", pixels, trainer.global_step, dataformats="HWC")

    def loss_figure(self, out: Path) -> Path | None:
        if not self.train_losses:
            return None
        steps, losses = zip(*self.train_losses)
        window = self.loss_window or max(1, len(losses) // 50)
        means = window_means(list(losses), window)
        curves = {"train (every update)": (steps, losses),
                  f"train (mean of {window} updates)": ([steps[i - 1] for i in means[0]], means[1])}
        if self.val_losses:
            curves["validation"] = tuple(zip(*self.val_losses))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for (label, (xs, ys)), style in zip(curves.items(), [dict(alpha=0.25, lw=0.5), dict(lw=1.5), dict(marker="o", lw=1.5)]):
            ax.plot(xs, ys, label=label, **style)
        ax.set(xlabel="update", ylabel="loss (nats per character)", title="Loss")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, out / "loss_curves.png")
        return out / "loss_curves.png"

    def ratio_figure(self, out: Path) -> Path | None:
        if not self.update_ratios:
            return None
        curves = {name: tuple(zip(*points)) for name, points in self.update_ratios.items()}
        return plot_curves(curves, out / "update_ratio.png", xlabel="update", ylabel="log10(update std / weight std)",
                           title="Update-to-data ratio per weight matrix (rule of thumb: about -3)")

    def activation_figure(self, pl_module, out: Path) -> Path | None:
        if self.probe is None:
            return None
        layers = self.activations(pl_module)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for name, (pre, post) in layers.items():
            saturated = (post.abs() > SATURATED).float().mean().item()
            axes[0].hist(pre.flatten().numpy(), bins=80, histtype="step", density=True, label=name)
            axes[1].hist(post.flatten().numpy(), bins=80, histtype="step", density=True,
                         label=f"{name}: {saturated:.1%} saturated")
        axes[0].set(title="pre-activations", xlabel="value")
        axes[1].set(title=f"tanh activations (saturated: |tanh| > {SATURATED})", xlabel="value")
        for ax in axes:
            ax.legend()
        save_figure(fig, out / "activations.png")
        return out / "activations.png"

    def embedding_figure(self, pl_module, out: Path, tb, step: int) -> Path | None:
        table = pl_module.token_embeddings() if hasattr(pl_module, "token_embeddings") else None
        labels = character_labels(pl_module)
        if table is None or labels is None:
            return None
        vectors = table.weight.detach().float().cpu()
        points = pca_2d(vectors)
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.scatter(points[:, 0], points[:, 1], s=180, alpha=0.3)
        for (x, y), label in zip(points.tolist(), labels):
            ax.text(x, y, label, ha="center", va="center", fontsize=11)
        kind = "PCA of the" if vectors.shape[1] > 2 else "the"
        ax.set(title=f"Character embeddings ({kind} {vectors.shape[1]}-D vectors)")
        ax.grid(alpha=0.3)
        save_figure(fig, out / "embedding.png")
        if tb is not None:
            tb.add_embedding(vectors, metadata=labels, global_step=step, tag="characters")
        return out / "embedding.png"

    def bigram_figures(self, pl_module, out: Path) -> list[Path]:
        counts = getattr(pl_module, "counts", None)
        labels = character_labels(pl_module)
        if counts is None or labels is None or counts.shape[0] != counts.shape[1]:
            return []  # only the bigram's square table is drawn (an n-gram's has V^n rows)
        counts = counts.detach().cpu()
        smoothing = pl_module.hparams.get("smoothing", 0.0)
        probs = (counts + smoothing) / (counts + smoothing).sum(1, keepdim=True)
        paths = []
        for name, table, fmt, title in (("bigram_counts", counts, "{:.0f}", "Bigram counts (row: this character, column: the next)"),
                                        ("bigram_probs", probs, "{:.2f}", "P(next | this), rows normalised")):
            size = len(labels)
            fig, ax = plt.subplots(figsize=(size * 0.55, size * 0.55))
            ax.imshow(table.numpy(), cmap="Blues")
            for i in range(size):
                for j in range(size):
                    ax.text(j, i, labels[i] + labels[j], ha="center", va="bottom", color="gray", fontsize=6)
                    ax.text(j, i, fmt.format(table[i, j].item()), ha="center", va="top", color="gray", fontsize=6)
            ax.set_xticks(range(size), labels)
            ax.set_yticks(range(size), labels)
            ax.set_title(title)
            save_figure(fig, out / f"{name}.png")
            paths.append(out / f"{name}.png")
        return paths
