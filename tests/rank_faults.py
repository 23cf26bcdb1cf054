"""Fault injection for the multi-process tests (``+callbacks.fault._target_=rank_faults.Fault``):
process ``rank`` fails at update ``at`` in one of the ways a real run does."""

from __future__ import annotations

import errno
import math
import os

import lightning as L


class Fault(L.Callback):
    """``kind``: ``loss`` (this process's training loss becomes non-finite: its batch only, the
    others' stay finite), ``disk`` (the disk is full when this process saves its next checkpoint),
    ``start`` (a process that Lightning starts, ``LOCAL_RANK`` ``rank``, fails as it builds its
    callbacks, before its trainer sets up)."""

    def __init__(self, rank: int, kind: str, at: int = 0):
        self.rank, self.kind, self.at = rank, kind, at
        if kind == "start" and os.environ.get("LOCAL_RANK") == str(rank):
            raise RuntimeError(f"process {rank} cannot start (rank_faults)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != self.rank or trainer.global_step < self.at:
            return
        if self.kind == "loss" and not hasattr(pl_module, "_honest_loss"):
            pl_module._honest_loss = pl_module.loss
            pl_module.loss = lambda logits, targets: pl_module._honest_loss(logits, targets) * math.nan
        if self.kind == "disk":
            def full(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync = full  # what a full disk makes of the checkpoint's last write
