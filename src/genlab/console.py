"""What a run prints: one summary line before training, a progress bar counted in optimizer updates
(or, without a terminal, a log line every few percent), and nothing a user cannot act on.

Lightning's own information lines (GPU/TPU availability, "Seed set to", a tip for another package,
checkpoint restoring) still reach ``train.log``: ``QuietConsole`` keeps them off the console only."""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm

from genlab.loop.steps import total_updates

log = logging.getLogger("genlab")

# Library warnings a user cannot act on, each silenced on purpose (the test suite silences the same
# list, tests/conftest.py):
SILENCED_WARNINGS = (
    # Lightning calls a torch pytree API that torch deprecates; the fix is Lightning's to make
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # a checkpoint taken every N steps under manual optimization (the DCGAN) holds the weights after
    # that step's update: that is the state a resume continues from, as intended
    "Using ModelCheckpoint with manual optimization",
    # a resumed run writes its checkpoints into the folder that already holds them, by design
    r"Checkpoint directory .* exists and is not empty",
    # genlab.loggers.CSVLogger keeps a resumed run's metrics.csv, which Lightning says it would delete
    r"Experiment logs directory .* exists and is not empty",
    # genlab's data modules prepare their batches in the main process on purpose (the batches are
    # slices of tensors or memory maps: workers would only add copies)
    r"The '\w+_dataloader' does not have many workers",
    # a run resumed mid-epoch: genlab's batch streams continue from the update count (the resume
    # tests compare the weights), and the DCGAN restarts the interrupted epoch of its image loader
    # (docs/dcgan.md); Lightning sees neither
    "You're resuming from a checkpoint that ended before the epoch ended",
    # trainer.log_every_n_steps counts optimizer updates in genlab (genlab.loop.steps.TrainingCurve), so an
    # epoch of fewer Lightning steps than that is no reason for Lightning's warning
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # where SLURM is installed Lightning suggests srun for every run; genlab reaches SLURM through
    # hydra/launcher=slurm (docs/distributed.md), which starts each job's processes itself
    "The `srun` command is available on your system but is not used",
    # loop.compile=true steps with torch's functional optimizer inside its graph, not optimizer.step(),
    # which a scheduler's first step looks for: the schedule itself is stepped after every update
    r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`",
    # the counting bigram has nothing to optimise: it fills its table of counts in one pass
    "`LightningModule.configure_optimizers` returned `None`",
)
for _message in SILENCED_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)


def printable(text: str) -> str:
    """Text that came from a file (a checkpoint's vocabulary, and so its samples) as a terminal may
    show it: control characters other than the newline escaped (``\\x1b``), so that a vocabulary
    holding terminal escape sequences cannot rewrite the screen or the title."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def route_library_logs() -> None:
    """Lightning gives its loggers a console handler of their own when it is imported before logging
    is configured (always, here): send their lines through the root's handlers instead, so that the
    console's filter and train.log both see them."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        library_log = logging.getLogger(name)
        for handler in list(library_log.handlers):
            library_log.removeHandler(handler)
        library_log.propagate = True
    compiler_log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, NoCudaHomeGuess) for f in compiler_log.filters):
        compiler_log.addFilter(NoCudaHomeGuess())


class NoCudaHomeGuess(logging.Filter):
    """torch.compile on a machine without CUDA (with torch's CUDA build, pip's default) warns that
    it guessed a CUDA_HOME; it compiles C++ for the CPU, so there is nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


class QuietConsole(logging.Filter):
    """The console's filter (conf/hydra/job_logging/console.yaml): genlab's and Hydra's information,
    and every library's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in ("genlab", "hydra", "__main__")


def count(n: int) -> str:
    """12100 -> "12.1K"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def run_summary(choices: dict, model: L.LightningModule, trainer: L.Trainer, run_dir,
                precision: str | None = None, validation: str | None = None) -> str:
    """One line: what trains on what, how big, where (``precision``: its words for the precision,
    genlab.loop.precision), how long, what a validation covers (``validation``) and where the run writes."""
    parameters = sum(p.numel() for p in model.parameters())
    device = f"{trainer.num_devices}x {choices['trainer']} ({precision or trainer.precision})"
    unit = UpdateProgress.unit(model)
    length = f"{trainer.max_steps:,} {unit}s" if trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
    validates = f"; {validation}" if validation else ""
    return (f"{choices['model']} on {choices['data']}: {count(parameters)} parameters, {device}, {length}{validates} "
            f"-> {run_dir}")


def result_summary(metrics: dict, run_dir, unit: str = "update") -> str:
    """One line at the end: the losses (or the GAN's), how long, how fast, where."""
    if "val_loss" in metrics:
        # bits per character: the figure that compares runs on different tokenizers
        bpc = f", {metrics['val_bpc']:.3f} bits/char" if metrics.get("val_bpc") is not None else ""
        shown = f"val {metrics['val_loss']:.4f}{bpc} (best {metrics['best_val_loss']:.4f})"
        if metrics.get("test_loss") is not None:
            shown += f", test {metrics['test_loss']:.4f}"
        speed = f"{metrics['tokens_per_second']:,.0f} tokens/s"
    else:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss_"))
        if metrics.get("fid") is not None:
            shown += (f", FID {metrics['fid']:.2f} (best {metrics['best_fid']:.2f}), "
                      f"KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}")
        speed = f"{metrics['images_per_second']:,.0f} images/s"
    if metrics.get("update_seconds") is not None:
        speed += f", {timedelta(seconds=round(metrics['update_seconds']))} of it in updates"
    return (f"{shown} after {metrics['steps']:,} {unit}s in {timedelta(seconds=round(metrics['train_seconds']))} "
            f"({speed}); {run_dir}/metrics.json")


class UpdateProgress(ProgressBar):
    """Progress in optimizer updates (``trainer.global_step``), whatever a Lightning step holds: the
    true total and ETA, continued on resume. On a terminal a bar; otherwise (a log file, a sweep
    under a launcher) a line every ``percent_per_line`` percent."""

    def __init__(self, percent_per_line: int = 5):
        super().__init__()
        self.percent_per_line = percent_per_line
        self._enabled = True
        self._bar: tqdm | None = None
        self._start = (0.0, 0)  # (time, update) when training started
        self._next_line = 0  # the update at which the next log line is due

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @staticmethod
    def total(trainer: L.Trainer) -> int:
        return total_updates(trainer)

    def on_train_start(self, trainer, pl_module):
        if not (self._enabled and trainer.is_global_zero):
            return
        done = trainer.global_step
        self._start = (time.perf_counter(), done)
        if sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns > 0:  # a terminal with a width
            self._bar = tqdm(total=self.total(trainer), initial=done, unit=self.unit(pl_module), dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)
        self._next_line = self.next_line_after(done, trainer)

    @staticmethod
    def losses(trainer) -> dict[str, float]:
        """What the model shows in the progress bar (its training loss, the GAN's two), and the last
        validation loss."""
        shown = {"loss" if key == "loss/train" else key: value for key, value in trainer.progress_bar_metrics.items()}
        if "loss/val" in trainer.callback_metrics:
            shown["val"] = trainer.callback_metrics["loss/val"]
        return {key: round(float(value), 3) for key, value in shown.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self._enabled and trainer.is_global_zero):
            return
        done, total = trainer.global_step, self.total(trainer)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        if done < self._next_line and done < total:
            return
        # the losses are read only every 1% (bar) or percent_per_line (log): reading a loss on a GPU waits for it
        if self._bar is not None:
            self._bar.set_postfix(self.losses(trainer), refresh=False)
        else:
            self.log_line(done, total, trainer)
        self._next_line = self.next_line_after(done, trainer)

    def next_line_after(self, done: int, trainer) -> int:
        """The next multiple of 1% (bar) or ``percent_per_line`` (log) of the total: lines come at
        the same update counts whatever a Lightning step holds."""
        step = max(1, self.total(trainer) * (1 if self._bar is not None else self.percent_per_line) // 100)
        return (done // step + 1) * step

    @staticmethod
    def unit(model) -> str:
        """An optimizer update; for the GAN a step (one batch: an update of each network)."""
        return "update" if getattr(model, "kind", "text") == "text" else "step"

    def log_line(self, done: int, total: int, trainer) -> None:
        started, first = self._start
        elapsed = time.perf_counter() - started
        rate = (done - first) / elapsed if elapsed > 0 else 0.0
        eta = timedelta(seconds=round((total - done) / rate)) if rate > 0 else "?"
        losses = " ".join(f"{k} {v}" for k, v in self.losses(trainer).items())
        log.info("%s %s/%s (%d%%) %s | %s elapsed, ETA %s", self.unit(trainer.lightning_module), f"{done:,}",
                 f"{total:,}", 100 * done // max(total, 1), losses, timedelta(seconds=round(elapsed)), eta)

    def on_validation_end(self, trainer, pl_module):
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_postfix(self.losses(trainer))

    def on_train_end(self, trainer, pl_module):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
