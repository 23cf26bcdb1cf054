"""Callbacks that every run gets (see ``genlab.train.build_trainer``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class ValidateAtEnd(L.Callback):
    """Validate (and so checkpoint) after the very last update too, not only every ``val_every``:
    the final validation loss and ``last.ckpt`` then describe the model the run ends with."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps_done = 0 < trainer.max_steps <= trainer.global_step
        epochs_done = (
            trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and trainer.current_epoch + 1 >= trainer.max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
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
