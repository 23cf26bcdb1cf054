"""How a stopped run continues: after a signal, what was saved and the command that continues it
(the resume command; in a sweep the sweep's command; under SLURM's SIGUSR1 the job requeued), and
where a diverged or interrupted run's last good state is."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import NoReturn

from genlab.run.checkpoints import read_checkpoint
from genlab.run.runs import slurm_job
from genlab.run.runtime import in_sweep, is_first_process, task_overrides
from genlab.run.stopping import GracefulStop, requeue_slurm_job
from genlab.sweeps import sweep_command


def report_stop(stop: GracefulStop, run_dir: Path) -> NoReturn:
    """After a signal: what was saved and how the run continues (the resume command; in a sweep the
    sweep's command; under SLURM's SIGUSR1 the job requeued), then exit 128 + signal."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    step = read_checkpoint(checkpoint)["global_step"] if checkpoint.exists() else None
    if step is not None:
        saved = f"stopped by {stop.name} at step {step}; saved {checkpoint}."
    else:
        saved = f"stopped by {stop.name} before the first checkpoint; nothing to resume."
    if stop.signum == signal.SIGUSR1 and slurm_job() is not None:
        how = (requeue_slurm_job(step, run_dir, stop.max_requeues) if is_first_process()
               else "the first process requeues the job")
    elif in_sweep():
        how = f"Continue the sweep (finished jobs are kept, this one resumes) with:\n  {sweep_command()}"
    elif checkpoint.exists():
        how = f"Resume with:\n  {resume_command(run_dir)}"
    else:
        how = f"Start again with:\n  {start_command()}"
    print(f"\n{saved}\n{how}", file=sys.stderr)
    sys.exit(stop.exit_status)


def how_to_continue(run_dir: Path) -> str:
    """The command that continues from the run's last good state, or starts it again if it has none."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return f"resume with:\n  {resume_command(run_dir)}"
    return f"start again with:\n  {start_command()}"


def start_command() -> str:
    return " ".join(["python train.py", *task_overrides()])


def resume_command(run_dir: Path) -> str:
    overrides = [o for o in task_overrides() if not o.startswith(("ckpt_path=", "overwrite="))]
    return " ".join(["python train.py", *overrides, f"ckpt_path={run_dir}"])


def last_good_state(run_dir: Path) -> str:
    """Where a diverged run's last good state is, if it saved one."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint.exists():
        return f"Its last validated state is {checkpoint}."
    return "No checkpoint was saved before that (the first comes with the first validation, at update val_every)."
