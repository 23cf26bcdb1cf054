"""A step is an optimizer update: ``trainer.max_steps``, ``val_every``, checkpoint intervals,
``callbacks.insight.every_n_steps`` and the x-axis of every curve count updates.

One Lightning step (one ``training_step`` call) makes K = ``model.updates_per_step`` updates, each
on its own batch (genlab.models.base), because Lightning's fixed work per step would otherwise cost
a tiny model most of its speed. So Lightning's own step and genlab's differ, and this module is
the one place that knows it: it counts each update in ``trainer.global_step`` and converts
intervals between the two counts. Everything else asks it.

Counting uses one private attribute of Lightning (the progress of manual optimization, which
Lightning's own ``optimizer.step()`` advances). ``tests/test_steps.py`` fails if that changes;
the tests have run with the Lightning versions in ``LIGHTNING_TESTED`` (pyproject.toml pins the
same range)."""

from __future__ import annotations

import math

import lightning as L

LIGHTNING_TESTED = ">=2.6,<2.7"


def count_update(trainer: L.Trainer) -> None:
    """Count one optimizer update in ``trainer.global_step``, as Lightning's ``optimizer.step()``
    does under manual optimization."""
    try:
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    except AttributeError:
        raise RuntimeError(f"this Lightning ({L.__version__}) keeps its step count elsewhere; genlab counts "
                           f"updates through it and is tested with lightning{LIGHTNING_TESTED}: install that "
                           "(pip install -e .) or update genlab.steps") from None
    progress.increment_completed()


def lightning_steps(updates: int, updates_per_step: int) -> int:
    """An interval in updates (``val_every``, a multiple of K) as Lightning steps."""
    return max(1, updates // updates_per_step)


def updates_left(trainer: L.Trainer) -> float:
    """Updates still to make before ``trainer.max_steps`` (the last Lightning step may hold more)."""
    return math.inf if trainer.max_steps <= 0 else max(0, trainer.max_steps - trainer.global_step)


def due_update(first: int, updates: int, every: int) -> int | None:
    """The update among ``first .. first + updates - 1`` (one Lightning step's) that is a multiple of
    ``every``, if there is one."""
    due = -(-first // every) * every
    return due if due < first + updates else None
