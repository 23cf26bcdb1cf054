"""Callbacks that every run gets (see ``genlab.cli.train.build_trainer``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from genlab.models.base import LanguageModel
from genlab.run.outputs import atomic_write_text
from genlab.cli.sample import continue_text, sample_names


class ValidateAtEnd(L.Callback):
    """Validate (and so checkpoint) after the very last update too, not only every ``val_every``:
    the final validation loss and ``last.ckpt`` then describe the model the run ends with."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps_done = 0 < trainer.max_steps <= trainer.global_step
        epochs_done = (
            trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and trainer.current_epoch + 1 >= trainer.max_epochs
            and batch_idx + 1 >= trainer.num_training_batches
        )
        if steps_done or epochs_done:
            trainer.should_stop = True  # Lightning then runs validation for this batch


class CheckpointAtEnd(L.Callback):
    """Write ``last.ckpt`` when training ends, however it ends: for models without validation (which
    is what saves a checkpoint otherwise), and for a run stopped by Ctrl-C or SIGTERM, also before
    its first validation."""

    def on_train_end(self, trainer, pl_module):
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")


class TrainingClock(L.Callback):
    """Seconds spent training, validation apart: from the start of training to its end, less the
    time from each validation's start until training goes on (the validation, the checkpoint it
    writes, the samples). ``update_seconds`` in metrics.json; the figure to compare with a trainer
    that reports its update times only."""

    def __init__(self):
        self.started = self.paused_at = None
        self.paused = 0.0
        self.seconds: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.started, self.paused_at, self.paused = time.perf_counter(), None, 0.0

    def on_validation_start(self, trainer, pl_module):
        if self.started is not None and self.paused_at is None:
            self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused += time.perf_counter() - self.paused_at
            self.paused_at = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.resume()

    def on_train_end(self, trainer, pl_module):
        self.resume()
        self.seconds = time.perf_counter() - self.started - self.paused


class Samples(L.Callback):
    """What a language model makes, after every validation (the last one follows the last update):
    ``num_samples`` whole names for names data; for running text, ``text_samples`` continuations of
    the first ``prompt_tokens`` tokens of the validation text by ``new_tokens`` tokens. Written to
    ``samples.txt`` (the latest) and TensorBoard's TEXT tab (each validation at its step). The noise
    is the same every time (``seed``), so the samples change only as the model does."""

    def __init__(self, num_samples: int = 20, text_samples: int = 3, prompt_tokens: int = 32,
                 new_tokens: int = 200, seed: int = 42):
        self.num_samples, self.text_samples = num_samples, text_samples
        self.prompt_tokens, self.new_tokens, self.seed = prompt_tokens, new_tokens, seed
        self.latest: list[str] = []

    def make(self, datamodule, model: LanguageModel) -> list[str]:
        tokenizer = datamodule.tokenizer
        if tokenizer.eos_id is not None:
            return sample_names(model, tokenizer, self.num_samples, self.seed)
        prompt = datamodule.split_tokens("val")[: min(self.prompt_tokens, model.block_size or self.prompt_tokens)]
        return continue_text(model, tokenizer, prompt.tolist(), self.text_samples, self.new_tokens, self.seed)

    def on_validation_end(self, trainer, pl_module):
        if (trainer.sanity_checking or not trainer.is_global_zero or self.num_samples <= 0
                or not isinstance(pl_module, LanguageModel)):
            return
        self.latest = self.make(trainer.datamodule, pl_module)
        names = trainer.datamodule.tokenizer.eos_id is not None
        atomic_write_text(Path(trainer.default_root_dir) / "samples.txt",
                          ("\n" if names else "\n\n---\n\n").join(self.latest) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):  # TensorBoard's markdown: two spaces end a line
                shown = "  \n".join(self.latest) if names else "\n\n---\n\n".join(self.latest)
                logger.experiment.add_text("samples", shown, trainer.global_step)
