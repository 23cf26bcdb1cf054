"""A sweep job's failure belongs to that job. A job that fails (a configuration that cannot work, a
bug, missing data) or diverges records ``status``, the message and its overrides in its own
``metrics.json`` and reports ``failed_loss`` to the sweeper, so the other jobs, and an Optuna
study, go on. When the sweep ends, ``SweepReport`` lists what did not complete and the command
exits with status 1 if any job failed (a diverged trial is a result of the search, not a failure).
This holds for every launcher: the jobs of the parallel launcher run in worker processes, which
an error would otherwise end together with the job beside it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from genlab.errors import GenlabError, TrainingDiverged
from genlab.outputs import write_metrics
from genlab.runtime import task_overrides

log = logging.getLogger("genlab")
NOT_COMPLETED = ("failed", "diverged")


def run_sweep_job(train: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """``train(cfg)`` for one job of a sweep; a failure is recorded in the job's folder instead of
    ending the sweep. Returns the loss the sweeper sees."""
    try:
        return train(cfg)
    except TrainingDiverged as err:
        status, error = "diverged", err
    except Exception as err:  # noqa: BLE001 (whatever one job hits, the others still run)
        status, error = "failed", err
        if not isinstance(err, GenlabError):  # a bug, not a bad input: keep its traceback in the log
            log.exception("this job failed")
    log.error("this job %s: %s; reported to the sweep with loss %g", status, error, cfg.failed_loss)
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", {
        "status": status, "error": str(error), "error_type": type(error).__name__,
        "overrides": task_overrides(), "reported_loss": cfg.failed_loss, "val_loss": None,
        "steps": getattr(error, "step", None)})
    return float(cfg.failed_loss)


def job_results(sweep_dir: Path) -> dict[str, dict | None]:
    """Each job folder of a sweep (named by its number) -> its metrics.json (None: none written)."""
    results = {}
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            results[job.name] = json.loads((job / "metrics.json").read_text())
        except (OSError, ValueError):
            results[job.name] = None
    return results


def summary(sweep_dir: Path) -> tuple[str, bool]:
    """A few lines on the jobs that did not complete, and whether any of them failed."""
    results = job_results(sweep_dir)
    bad = {job: m for job, m in results.items() if m is None or m.get("status") in NOT_COMPLETED}
    if not bad:
        return f"sweep: all {len(results)} jobs completed ({sweep_dir})", False
    lines = [f"sweep: {len(results) - len(bad)} of {len(results)} jobs completed; these did not ({sweep_dir}):"]
    for job, metrics in bad.items():
        if metrics is None:
            lines.append(f"  job {job}: no metrics.json (stopped or killed before it ended)")
        else:
            lines.append(f"  job {job} ({' '.join(metrics.get('overrides') or [])}) {metrics['status']}: {metrics['error']}")
    failed = any(m is None or m.get("status") == "failed" for m in bad.values())
    return "\n".join(lines), failed


class SweepReport(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): after a sweep, the summary, and exit status 1
    when a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        text, failed = summary(sweep_dir)
        print(text, file=sys.stderr if failed else sys.stdout)
        if failed:
            sys.exit(1)
