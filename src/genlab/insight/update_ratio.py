"""``update_ratio.png`` and ``network/update_ratio_log10/<matrix>``: log10(std(update) / std(weights))
of each weight matrix, for the update due every ``every_n_steps``: the real update, whatever the
optimizer (SGD, Adam, ...), taken around the optimizer's ``step`` by hooks that are installed only
on the Lightning step that holds a due update."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from genlab.figures import plot_curves
from genlab.insight.board import tensorboard
from genlab.steps import next_due_update


def weight_matrices(model, optimizer) -> dict:
    """The optimizer's weight matrices (2-D and up), by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]
            if p.dim() >= 2 and id(p) in names}


class UpdateRatios:
    def __init__(self, timed):
        self.timed = timed  # the callback's clock: this work counts as the callback's own time
        self.points: dict[str, list[tuple[int, float]]] = {}
        self._hooks = []

    def arm(self, trainer, model, every_n_steps: int) -> None:
        """Before a Lightning step: if one of its updates is due, hook the optimizers around it."""
        due = next_due_update(trainer, every_n_steps)
        if due is not None:
            for optimizer in trainer.optimizers:
                self._measure(trainer, model, optimizer, calls_before=due - trainer.global_step - 1, step=due)

    def disarm(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _measure(self, trainer, model, optimizer, calls_before: int, step: int) -> None:
        calls, before = itertools.count(), {}

        def snapshot(opt, args, kwargs):
            if next(calls) == calls_before:
                with self.timed():
                    before.update({n: p.detach().clone() for n, p in weight_matrices(model, opt).items()})

        def compare(opt, args, kwargs):
            if not before:
                return
            with self.timed():
                tb = tensorboard(trainer) if trainer.is_global_zero else None
                for name, p in weight_matrices(model, opt).items():
                    ratio = ((p.detach() - before[name]).std() / (before[name].std() + 1e-12)).item()
                    value = math.log10(ratio) if ratio > 0 else -10.0
                    self.points.setdefault(name, []).append((step, value))
                    if tb is not None:
                        tb.add_scalar(f"network/update_ratio_log10/{name}", value, step)
                before.clear()

        self._hooks += [optimizer.register_step_pre_hook(snapshot), optimizer.register_step_post_hook(compare)]

    def figure(self, out: Path) -> Path | None:
        if not self.points:
            return None
        curves = {name: tuple(zip(*points)) for name, points in self.points.items()}
        return plot_curves(curves, out / "update_ratio.png", xlabel="update", ylabel="log10(update std / weight std)",
                           title="Update-to-data ratio per weight matrix (rule of thumb: about -3)")

