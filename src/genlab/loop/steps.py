"""The update loop. A step is an optimizer update: ``trainer.max_steps``, ``val_every``, checkpoint
intervals, ``callbacks.insight.every_n_steps``, ``trainer.log_every_n_steps`` and the x-axis of every
curve count updates.

One Lightning step (one ``training_step`` call) makes K = ``loop.updates_per_step`` updates, each
on its own batch, because Lightning's fixed work per step would otherwise cost a tiny model most of
its speed. K changes speed only, and this module owns it, with the base models that make the
updates (``genlab.models.module``, ``genlab.models.base``): it chooses K under ``auto``, groups the
plain batches of a data module's training loader by K for a fit (``fit``: ``UpdateGroup``), counts
each update in ``trainer.global_step``, calls the callbacks that act on an update (``UpdateHook``,
every N updates, with the update's number), and turns every update's loss into a curve whose points
do not depend on K (``TrainingCurve``). Data modules, callbacks and models written against it never
see K.

Counting uses one private attribute of Lightning (the progress of manual optimization, which
Lightning's own ``optimizer.step()`` advances). ``tests/test_steps.py`` fails if that changes;
the tests have run with the Lightning versions in ``LIGHTNING_TESTED`` (pyproject.toml pins the
same range)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import statistics
import time
from typing import Iterable, Iterator, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from genlab.run.checks import asked_interval
from genlab.data.batches import trim, widths
from genlab.errors import ConfigError
from genlab.loop.precision import uses_cuda

LIGHTNING_TESTED = ">=2.6,<2.7"
# Lightning's fixed work per step (its loops, hooks, logging, the progress bar, genlab's callbacks): an
# upper estimate of the "ms per Lightning step" that docs/performance.md's benchmark table measures
# (its loop.updates_per_step=1 row), kept above it for slower machines than the table's
LIGHTNING_STEP_SECONDS = 0.004
MAX_STEP_SHARE = 0.02  # loop.updates_per_step=auto keeps Lightning's share of the time under this
AUTO_COUNT_VARIABLE = "GENLAB_AUTO_UPDATES_PER_STEP"  # auto's count, for the processes Lightning starts
# min | max: auto takes its smallest (1) or largest (val_every) count without timing anything, so
# that the test suite can check that nothing it asserts depends on the count a machine's speed picks
FORCED_AUTO_VARIABLE = "GENLAB_AUTO_UPDATES"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """``conf/loop``: how the loop trains a model, whichever model it is (``train.build_model`` gives
    them to the model it builds; checked by ``genlab.run.checks``). Not the model's hyper-parameters: a
    checkpoint's model loads and samples without them."""

    updates_per_step: int | str = 1  # K, or "auto"
    grad_clip: float | None = None  # the gradients' largest norm; None: not clipped
    compile: bool | str = False  # torch.compile: False, True or one of its modes


# the settings of LoopSettings, which earlier genlab kept among the model's (model.updates_per_step, ...)
LOOP_KEYS = tuple(field.name for field in dataclasses.fields(LoopSettings))


def count_update(trainer: L.Trainer) -> None:
    """Count one optimizer update in ``trainer.global_step``, as Lightning's ``optimizer.step()``
    does under manual optimization."""
    try:
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    except AttributeError:
        raise RuntimeError(f"this Lightning ({L.__version__}) keeps its step count elsewhere; genlab counts "
                           f"updates through it and is tested with lightning{LIGHTNING_TESTED}: install that "
                           "(pip install -e .) or update genlab.loop.steps") from None
    progress.increment_completed()


def updates_left(trainer: L.Trainer) -> float:
    """Updates still to make before ``trainer.max_steps`` (the last Lightning step may hold more)."""
    return math.inf if trainer.max_steps <= 0 else max(0, trainer.max_steps - trainer.global_step)


class UpdateHook:
    """A callback that acts on an update: the loop calls ``before_update`` and ``after_update``
    around every update whose number (1, 2, ...: ``trainer.global_step`` once it is made) is a
    multiple of ``every_n_updates``, whatever Lightning step it falls in. A Lightning callback that
    is also an ``UpdateHook`` is found among the trainer's callbacks at the start of training."""

    every_n_updates: int = 1

    def before_update(self, trainer: L.Trainer, module, update: int) -> None:
        """Before update number ``update``: its parameters are as the previous update left them."""

    def after_update(self, trainer: L.Trainer, module, update: int) -> None:
        """Right after update number ``update`` (counted in ``trainer.global_step``)."""


def update_hooks(trainer: L.Trainer) -> list[UpdateHook]:
    return [callback for callback in trainer.callbacks if isinstance(callback, UpdateHook)]


# --- grouping a data module's plain batches by K ------------------------------------------------
def pad_to(x: torch.Tensor, y: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded on the right to ``width``: inputs 0, targets -1 (padding predicts nothing)."""
    return F.pad(x, (0, width - x.shape[1]), value=0), F.pad(y, (0, width - y.shape[1]), value=-1)


class UpdateGroup(NamedTuple):
    """The K batches of one Lightning step as three tensors (Lightning moves them to the device at
    once, cheaper than a list of K pairs): xs and ys (K, B, T) padded to the widest batch, and each
    batch's own width."""

    xs: torch.Tensor
    ys: torch.Tensor
    widths: torch.Tensor

    @classmethod
    def of(cls, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> "UpdateGroup":
        if len({x.shape for x, _ in batches}) > 1:  # a stream whose batches differ in width
            widest = max(x.shape[1] for x, _ in batches)
            batches = [pad_to(x, y, widest) for x, y in batches]
        xs, ys = torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
        each = widths(ys)  # one pass over the group, not one a batch
        width = int(each.max())
        return cls(xs[..., :width], ys[..., :width], each)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches (x, y), each trimmed to its own width (its trailing padding left out)."""
        for x, y, width in zip(self.xs, self.ys, self.widths.tolist()):
            yield x[:, :width], y[:, :width]


class UpdateGroups:
    """A training loader of plain ``(x, y)`` batches, one per update, handed over K at a time. Every
    group holds K batches: one that reaches the end of a pass over the loader takes the rest from
    the next pass (so that each Lightning step is K updates, and validations land on multiples of
    ``val_every``); a Lightning epoch is about one pass."""

    def __init__(self, batches: Iterable, count: int):
        self.plain, self.count = batches, count

    def __len__(self) -> int:
        return max(1, len(self.plain) // self.count)

    def __iter__(self) -> Iterator[UpdateGroup]:
        if self.stream is None:
            self.stream = itertools.chain.from_iterable(itertools.repeat(self.plain))  # pass after pass
        for _ in range(len(self)):
            yield UpdateGroup.of(list(itertools.islice(self.stream, self.count)))

    stream: Iterator | None = None  # the plain batches, continued from one Lightning epoch to the next


class GroupedTraining:
    """A data module's ``train_dataloader`` for the length of a fit: its loader grouped by K (an
    attribute of the instance, so nothing of the data module's own changes, and it pickles)."""

    def __init__(self, plain, count: int):
        self.plain, self.count = plain, count

    def __call__(self) -> UpdateGroups:
        return UpdateGroups(self.plain(), self.count)


def batches_of(batch) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """What a Lightning step trains on, as (x, y) batches trimmed of their trailing padding: a
    group's K, or a plain batch (a fit outside ``fit``, such as the LR finder's) as one."""
    return batch.batches() if isinstance(batch, UpdateGroup) else (trim(*batch),)


def real_targets(batch, updates: int) -> int:
    """The real targets (not padding) of a Lightning step's first ``updates`` batches: one read
    from the device a step, not one an update."""
    ys = batch.ys[:updates] if isinstance(batch, UpdateGroup) else batch[1]
    return int((ys >= 0).sum())


def fit(trainer: L.Trainer, model, datamodule, count: int, **fit_arguments) -> None:
    """``trainer.fit`` with ``count`` updates per Lightning step: the model makes them, the data
    module's training loader is grouped by the count, and the processes Lightning starts for DDP
    inherit it (``AUTO_COUNT_VARIABLE``: they must validate at the same steps)."""
    model.updates_per_step = count
    if count > 1:  # one update a step takes the plain batches as they come
        datamodule.train_dataloader = GroupedTraining(datamodule.train_dataloader, count)
    os.environ[AUTO_COUNT_VARIABLE] = str(count)
    try:
        trainer.fit(model, datamodule=datamodule, **fit_arguments)
    finally:
        os.environ.pop(AUTO_COUNT_VARIABLE, None)
        vars(datamodule).pop("train_dataloader", None)


# --- intervals in updates and in Lightning steps -------------------------------------------------
def validation_interval(cfg: DictConfig, updates_per_step: int) -> int:
    """The asked interval as a multiple of ``updates_per_step``, since validation falls between
    Lightning steps (each that many updates): val_every=null rounds down (at least one step)."""
    interval = asked_interval(cfg)
    if cfg.val_every is None:
        return max(1, interval // updates_per_step) * updates_per_step
    if interval % updates_per_step:
        raise ConfigError(f"val_every={interval} must be a multiple of loop.updates_per_step={updates_per_step}")
    return interval


def validation_check_interval(cfg: DictConfig, updates_per_step: int) -> int:
    """Lightning's ``val_check_interval``, in its steps, for validations every ``validation_interval`` updates."""
    return max(1, validation_interval(cfg, updates_per_step) // updates_per_step)


def total_updates(trainer: L.Trainer) -> int:
    """The updates a fit makes: ``trainer.max_steps``, or those of its ``trainer.max_epochs`` epochs."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.num_training_batches * trainer.lightning_module.updates_per_step * trainer.max_epochs)


class TrainingCurve:
    """Every update's loss as a curve of fixed points: one every ``every`` updates, at that update,
    the mean of the ``every`` updates up to it. The points are the same whatever K is (a Lightning
    step may hold several points, or none). The open window is kept in checkpoints, so a resumed run
    draws the same points too. Losses stay on their device until a point is due (one read per point)."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.read: list[float] = []  # the open window's losses already read (restored from a checkpoint)
        self.pending: list[torch.Tensor] = []  # ... and those still on the device

    def add(self, losses: list[torch.Tensor], last_update: int) -> list[tuple[int, float]]:
        """The losses of updates ``last_update - len(losses) + 1 .. last_update``; returns the points due."""
        points = []
        for update, loss in zip(range(last_update - len(losses) + 1, last_update + 1), losses):
            self.pending.append(loss)
            if update % self.every == 0:
                values = self.state()
                points.append((update, math.fsum(values) / len(values)))  # fsum: exact, whatever the order
                self.read, self.pending = [], []
        return points

    def state(self) -> list[float]:
        """The open window's losses, for a checkpoint."""
        return self.read + (torch.stack(self.pending).float().tolist() if self.pending else [])

    def restore(self, values: list[float]) -> None:
        self.read, self.pending = [float(v) for v in values], []


# --- loop.updates_per_step: auto --------------------------------------------------------------------
def choose_updates_per_step(update_seconds: float, val_every: int) -> int:
    """The fewest updates per Lightning step that keep Lightning's share under MAX_STEP_SHARE, among
    the divisors of ``val_every`` (validation falls between Lightning steps); at most ``val_every``."""
    wanted = math.ceil(LIGHTNING_STEP_SECONDS * (1 - MAX_STEP_SHARE) / (MAX_STEP_SHARE * update_seconds))
    return next((k for k in range(1, val_every + 1) if val_every % k == 0 and k >= wanted), val_every)


def measure_update_seconds(model, datamodule, device: torch.device | None = None,
                           autocast_dtype: torch.dtype | None = None, updates: int = 12) -> float:
    """Seconds per optimizer update of a language model on its own training batches, on ``device``
    (the one training will use) under ``autocast_dtype`` (bf16-mixed, 16-mixed): the median of
    ``updates`` plain updates of a copy (two more first, untimed; on a GPU each timed to its end).
    Where ``loop.compile`` will compile the whole update, the compiled update is timed (several
    times faster on a small model): batches padded to the widest, so that one graph is compiled
    (and cached for training's own); under DDP, which compiles ``forward`` only, that overrates
    the speed and the count only grows. The model, its optimizer state and the random stream are left
    as they were."""
    device = device or torch.device("cpu")
    probe = copy.deepcopy(model).to(device)
    configured = probe.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    batches = [trim(*(t.to(device) for t in batch))
               for batch in itertools.islice(iter(datamodule.train_dataloader()), updates + 2)]
    random_state = torch.get_rng_state()
    finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if autocast_dtype != torch.float16 and (compiled := probe.timed_compiled_update(optimizer, device)) is not None:
        widest = max(x.shape[1] for x, _ in batches)
        batches, update = [pad_to(x, y, widest) for x, y in batches], compiled
    else:
        def update(x, y):
            loss = probe.loss(probe.training_forward(x, y), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = []
    try:
        for x, y in batches:
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                update(x, y)
            finish()
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_rng_state(random_state)
    return statistics.median(seconds[2:] or seconds)


def training_device(trainer_cfg) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast type a ``trainer`` config trains with (for timing updates before the
    trainer exists)."""
    cuda = uses_cuda(trainer_cfg)
    precision = str(trainer_cfg.get("precision", "32-true"))
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.device("cuda" if cuda else "cpu"), autocast


def resolve_updates_per_step(model, datamodule, val_every: int, checkpoint: dict | None = None,
                             trainer_cfg=None) -> int:
    """K for this run (``chosen_count``), which the model then trains with."""
    model.updates_per_step = count = chosen_count(model, datamodule, val_every, checkpoint, trainer_cfg)
    return count


def chosen_count(model, datamodule, val_every: int, checkpoint: dict | None, trainer_cfg) -> int:
    """``loop.updates_per_step``, or for ``auto`` the count chosen by timing the model's updates on
    the device of ``trainer_cfg``. A resumed run keeps the count it was trained with, so that
    Lightning's restored step count still lands its validations on multiples of ``val_every``. The
    processes that Lightning starts for DDP take the first process's count (``AUTO_COUNT_VARIABLE``):
    they must validate at the same steps. A single-pass model (the counting bigram) makes one update
    per Lightning step, so that its pass ends exactly at the end of the data, as does a model that
    makes one per step (``several_updates_per_step``: the GAN)."""
    requested = model.loop.updates_per_step
    if not model.several_updates_per_step and requested not in ("auto", 1):
        raise ConfigError(f"loop.updates_per_step={requested}: this model makes one update per Lightning step; "
                          "leave it at auto (or 1)")
    if model.single_pass or not model.several_updates_per_step:
        return 1
    if requested != "auto":
        return requested
    used = (checkpoint or {}).get("genlab", {}).get("updates_per_step")
    if isinstance(used, int) and val_every % used == 0:
        return used
    inherited = os.environ.get(AUTO_COUNT_VARIABLE)
    if inherited and val_every % int(inherited) == 0:
        return int(inherited)
    forced = os.environ.get(FORCED_AUTO_VARIABLE)
    if forced:
        if forced not in ("min", "max"):
            raise ConfigError(f"{FORCED_AUTO_VARIABLE}={forced}: use min or max, or unset it")
        return 1 if forced == "min" else val_every
    device, autocast = training_device(trainer_cfg or {})
    return choose_updates_per_step(measure_update_seconds(model, datamodule, device, autocast), val_every)


def check_same_count(trainer: L.Trainer, updates_per_step: int) -> None:
    """Processes started apart (SLURM, torchrun) time their updates apart and could choose different
    counts under ``auto``, then validate at different steps and hang: refuse that at the start."""
    if trainer.world_size > 1 and trainer.strategy.broadcast(updates_per_step, src=0) != updates_per_step:
        raise ConfigError(f"the processes of this run chose different loop.updates_per_step under auto; "
                          f"set it for all of them, e.g. loop.updates_per_step={updates_per_step}")
