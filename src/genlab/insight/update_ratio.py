"""``update_ratio.png`` and ``network/update_ratio_log10/<matrix>``: log10(std(update) / std(weights))
of each weight matrix, for the update due every ``every_n_steps``: the real update, whatever the
optimizer (SGD, Adam, ...; the GAN's two), the weights compared before and after it (the insight
callback is called around the due update by the loop, ``genlab.loop.steps.UpdateHook``)."""

from __future__ import annotations

import math
from pathlib import Path

from genlab.results.figures import plot_curves


def weight_matrices(model, optimizer) -> dict:
    """The optimizer's weight matrices (2-D and up), by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]
            if p.dim() >= 2 and id(p) in names}


def optimized_matrices(trainer, model) -> dict:
    """The weight matrices of every optimizer of the run (the GAN's two networks), by name."""
    return {name: p for optimizer in trainer.optimizers for name, p in weight_matrices(model, optimizer).items()}


class UpdateRatios:
    def __init__(self):
        self.points: dict[str, list[tuple[int, float]]] = {}
        self._before: dict = {}

    def before(self, trainer, model) -> None:
        """Before the due update: the weights it starts from."""
        self._before = {name: p.detach().clone() for name, p in optimized_matrices(trainer, model).items()}

    def after(self, trainer, model, update: int, tb) -> None:
        """After it: each matrix's ratio, as a point of the figure and in TensorBoard (``tb``, or None)."""
        for name, p in optimized_matrices(trainer, model).items():
            start = self._before[name]
            ratio = ((p.detach() - start).std() / (start.std() + 1e-12)).item()
            value = math.log10(ratio) if ratio > 0 else -10.0
            self.points.setdefault(name, []).append((update, value))
            if tb is not None:
                tb.add_scalar(f"network/update_ratio_log10/{name}", value, update)
        self._before = {}

    def figure(self, out: Path) -> Path | None:
        if not self.points:
            return None
        curves = {name: tuple(zip(*points)) for name, points in self.points.items()}
        return plot_curves(curves, out / "update_ratio.png", xlabel="update", ylabel="log10(update std / weight std)",
                           title="Update-to-data ratio per weight matrix (rule of thumb: about -3)")

