"""Every way to stop a run takes one path: Ctrl-C (SIGINT), ``kill`` (SIGTERM), or SLURM's
pre-emption and time-limit warning (SIGUSR1, ``--signal=USR1@120``). The run saves the checkpoint
of its last finished update within moments, then ends with exit status 128 + the signal's number and
prints the command that resumes it; under SLURM, SIGUSR1 requeues the job instead
(``requeue_slurm_job``), and the requeued job resumes from that one checkpoint. Lightning's own
SIGUSR1 handler (a checkpoint in the middle of a step, then a second one when the SIGTERM that
follows the requeue arrives) is not installed, since this one is in place first.

- During training: the current Lightning step finishes; a validation that follows it, or that was
  running, is abandoned after its current batch; ``last.ckpt`` is saved (``on_exception``, or
  ``CheckpointAtEnd`` where nothing validates), then training stops. A resumed run starts with
  the validation it abandoned (Lightning restarts an interrupted validation from its start).
- Before training or during the wrap-up (final evaluation, samples, ``metrics.json``): the work
  stops at once. ``last.ckpt`` already holds the finished training, and resuming does the wrap-up.
- A second signal stops at once, wherever it lands; a repeated SIGUSR1 is the same request (SLURM
  may deliver it to the batch shell and the tasks both).
- Under DDP the ranks agree after every step and every validation batch whether any of them was
  asked to stop, so all of them stop at the same point."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class RunInterrupted(BaseException):
    """Abandons the work in progress at once (a BaseException, so that no ``except Exception``
    on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop(L.Callback):
    def __init__(self, max_requeues: int = 3):
        self.max_requeues = max_requeues  # SIGUSR1 under SLURM requeues the job at most this often
        self.signum: int | None = None  # the signal received by this process
        self.stop_requested = False  # training was asked to stop (on every rank under DDP)
        self.trainer: L.Trainer | None = None  # set while trainer.fit runs (see setup)
        self._previous = {}
        self._abandoned = False  # a validation was abandoned for the stop request

    # --- installing the handler ------------------------------------------------------------------
    def __enter__(self):
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        self._install()
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _install(self) -> None:
        for s in SIGNALS:
            signal.signal(s, self.handle)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":  # from here on a signal asks training to stop
            self.trainer = trainer

    # Lightning puts its own SIGTERM handler in place when a stage starts; it would end the run
    # with exit status 0 and no checkpoint. Each stage's first hook puts this one back.
    def on_train_start(self, trainer, pl_module):
        self._install()

    def on_validation_start(self, trainer, pl_module):
        self._install()

    def on_test_start(self, trainer, pl_module):
        self._install()

    # --- the signal ------------------------------------------------------------------------------
    def handle(self, signum, frame) -> None:
        first = self.signum is None
        if signum == self.signum == signal.SIGUSR1:
            return  # the same request again
        self.signum = signum
        if not first or self.trainer is None:
            raise RunInterrupted(signum)
        self.stop_requested = True
        if self.trainer.world_size == 1:  # under DDP on_train_batch_end stops every rank together
            self.trainer.should_stop = True  # Lightning validates (and checkpoints) at a stop request

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.world_size > 1:
            self.stop_requested = trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False)
            if self.stop_requested:
                trainer.should_stop = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.trainer is None:  # the wrap-up's evaluation: a signal there stops at once
            return
        if trainer.world_size > 1:
            self.stop_requested = trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False)
        if self.stop_requested:  # the checkpoint first (on_exception): the validation is redone on resume
            self._abandoned = True
            raise RunInterrupted(self.signum or signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception):
        self.trainer = None
        if self._abandoned:  # between updates (a second signal may land inside one: not saved then)
            checkpoint = trainer.checkpoint_callback  # the weights of the last finished update
            if checkpoint is not None and checkpoint.dirpath:
                trainer.save_checkpoint(Path(checkpoint.dirpath) / "last.ckpt")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """The abandoned validation's progress as Lightning records a validation cut short before its
        first batch was done: a resumed run then runs it again, whole, before it trains on."""
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
        if self._abandoned and progress:
            done = progress["total"]["completed"] - progress["current"]["completed"]  # by earlier validations
            progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done, "completed": done}
            progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
            progress["is_last_batch"] = False

    def on_fit_end(self, trainer, pl_module):
        self.trainer = None  # from here on (the wrap-up) a signal stops at once

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)  # a rank that only followed the others: SIGTERM's

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name


def requeue_slurm_job(step: int | None, run_dir, max_requeues: int) -> str:
    """Put this SLURM job back in the queue (its array task, in a job array), if that continues the
    run: it has a checkpoint (``step``, None: none yet) and has been requeued fewer than
    ``max_requeues`` times (``SLURM_RESTART_COUNT``); what happened, in words. SLURM then ends this
    run with SIGTERM: it is ignored from here, the checkpoint is saved already."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        return f"not requeued: {job!r} is not a SLURM job id"
    if step is None:  # a start-up longer than the signal's lead would requeue for ever
        return (f"not requeued: SLURM job {job} was stopped before its first checkpoint, so another attempt would "
                "start from step 0 again; give it a longer time limit (or validate sooner: val_every=...), then "
                "submit it again")
    requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if requeues >= max_requeues:
        return (f"not requeued: SLURM job {job} has been requeued {requeues} times, max_requeues={max_requeues}; "
                f"submit it again to continue from step {step} in {run_dir}, or raise max_requeues")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeueing SLURM job {job} failed ({err}); submit it again to continue from step {step} in {run_dir}"
    if done.returncode != 0:
        return (f"requeueing SLURM job {job} failed ({done.stderr.strip() or done.returncode}); submit it again to "
                f"continue from step {step} in {run_dir}")
    return (f"requeued SLURM job {job} ({requeues + 1} of at most {max_requeues} requeues): its next attempt "
            f"continues from step {step} in {run_dir}")
