"""A sweep job's failure belongs to that job. A job that fails or diverges once it owns its folder
(``genlab.run.runs.RunFolder.claim``) records ``status``, the message and its overrides in its own
``metrics.json``; a job that fails before (a configuration that cannot work, missing data, a folder
that holds another plan's run or that another process holds) records that beside the folder
(``<sweep>/<job>.refused.json``), never in it, so a folder's finished run is never lost. Either way
it reports ``failed_loss`` to the sweeper, so the other jobs, and an Optuna study, go on. When the sweep ends, ``SweepReport`` lists what did
not complete and the command exits with status 1 if any job failed or was refused (a diverged trial
is a result of the search, not a failure). This holds for every launcher: the jobs of the parallel
launcher run in worker processes, which an error would otherwise end together with the job beside it.

The same sweep command again over the same sweep folder continues the sweep: each job finds its
folder (``genlab.run.runs.RunFolder``) and keeps a finished run as it is, resumes an interrupted one from
its newest checkpoint, or runs; a stop prints that command (``sweep_command``). Optuna workers that
share one storage find the study made once, before they race for it (``prepare_study``). An Optuna
job's folder is named by its trial's number, which goes on when a study is continued (Hydra's job
numbers start again at 0), so a new trial never meets an old trial's folder; a trial that a stopped
sweep left running is marked failed when the study continues (``fail_interrupted_trials``)."""

from __future__ import annotations

import logging
import hashlib
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra.utils import get_class

from genlab.errors import FolderTaken, GenlabError, TrainingDiverged
from genlab.run.outputs import write_metrics
from genlab.results.quality import require_weights
from genlab.run.plan import PLAN_FILE
from genlab.run.runs import held, owned_folder
from genlab.run.runtime import is_first_process, task_overrides
from genlab.run.trust import read_json

log = logging.getLogger("genlab")
NOT_COMPLETED = ("failed", "refused", "diverged")
SWEEP_COMMAND = "GENLAB_SWEEP_COMMAND"  # the command that continues the sweep, for its jobs
SWEPT_KEYS = "GENLAB_SWEPT_KEYS"  # set by SweepReport when a sweep starts; its jobs inherit it
# an Optuna job's trial number, given to the job as hydra.job.env_set.GENLAB_OPTUNA_TRIAL (its folder's number)
OPTUNA_TRIAL = "GENLAB_OPTUNA_TRIAL"
SWEEP_DIR_ATTR = "genlab_sweep_dir"  # a trial's user attribute: the sweep folder its job's folder is in


# --- job folders named by what differs ------------------------------------------------------------
def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: sweep overrides on the command line (``lr=0.01,0.1``, ``choice(...)``)
    and the sweeper's own search space (``hydra.sweeper.params``, Optuna's)."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    keys += list(config.hydra.sweeper.get("params") or {})
    return list(dict.fromkeys(keys))


def short_value(value: str) -> str:
    """0.06184186727700784 -> 0.0618; whole numbers and words as they are."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or not math.isfinite(number) else f"{number:.3g}"


def job_dir_name(num: int, overrides) -> str:
    """A sweep job's folder: its number, then the swept values (``3-lr=0.1,n_embd=30``): short
    (last key part where unambiguous, 3 significant digits), filesystem-safe and unique (the number)."""
    swept = [k for k in os.environ.get(SWEPT_KEYS, "").split(",") if k]
    values = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") in swept:
            values[key.lstrip("+~")] = short_value(value)
    last_parts = [k.rsplit(".", 1)[-1] for k in values]
    names = [short if last_parts.count(short) == 1 else key for key, short in zip(values, last_parts)]
    label = ",".join(f"{name}={value}" for name, value in zip(names, values.values()))
    label = re.sub(r"[^\w.,=+-]", "_", label)[:120]
    return f"{num}-{label}" if label else str(num)


OmegaConf.register_new_resolver("genlab_job_dir", job_dir_name, replace=True)


def refusal_file(job_dir: Path) -> Path:
    return job_dir.parent / f"{job_dir.name}.refused.json"


def run_sweep_job(train: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """``train(cfg)`` for one job of a sweep; a failure is recorded in the job's folder where the job
    owned it (it had claimed it: ``genlab.run.runs``), else beside it, instead of ending the sweep. Returns
    the loss the sweeper sees."""
    job_dir = Path(cfg.paths.output_dir)
    first = is_first_process()  # the other processes of a distributed job write nothing
    try:
        loss = train(cfg)
    except TrainingDiverged as err:
        status, error = "diverged", err
    except Exception as err:  # noqa: BLE001 (whatever one job hits, the others still run)
        status, error = ("refused" if isinstance(err, FolderTaken) else "failed"), err
        if not isinstance(err, GenlabError):  # a bug, not a bad input: keep its traceback in the log
            log.exception("this job failed")
    else:
        if first:
            refusal_file(job_dir).unlink(missing_ok=True)  # refused once, it has run since
        return loss
    # a job that ran reports failed_loss (a diverged trial is a result of the search); one that never
    # ran in its folder reports nothing: the Optuna sweeper then marks its trial failed, not measured
    owned = owned_folder(error)
    loss = float(cfg.failed_loss) if owned else None
    log.error("this job %s: %s; %s", status, error,
              f"reported to the sweep with loss {loss:g}" if owned else "it did not run, so it reports no loss")
    if first:
        write_metrics(job_dir / "metrics.json" if owned else refusal_file(job_dir), {
            "status": status, "error": str(error), "error_type": type(error).__name__,
            "overrides": task_overrides(), "reported_loss": loss, "val_loss": None,
            "steps": getattr(error, "step", None)})
    return loss


def continue_command(config: DictConfig) -> str:
    """The sweep's command line, with its folder: run again, it continues the sweep."""
    hydra = [o for o in config.hydra.overrides.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    args = ["-m", *hydra, *config.hydra.overrides.task, f"hydra.sweep.dir={config.hydra.sweep.dir}"]
    return " ".join(["python train.py", *map(shlex.quote, args)])


def sweep_command() -> str:
    return os.environ.get(SWEEP_COMMAND) or "python train.py -m ... (the sweep's command, with hydra.sweep.dir=...)"


def prepare_study(sweeper: DictConfig) -> None:
    """Create an Optuna study's storage and study once, under a file lock, before the sweeper opens
    it: workers started together on one storage otherwise race to create its tables. On a database
    server another machine may win that race (the lock is this machine's): then the study exists."""
    storage, name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return
    import optuna
    from filelock import FileLock

    url = str(storage)
    if url.startswith("sqlite:///"):  # one file, however its path is written
        url = f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
    lock = Path(tempfile.gettempdir()) / f"genlab-optuna-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"
    direction = sweeper.get("direction") or "minimize"
    directions = {"directions": list(direction)} if not isinstance(direction, str) else {"direction": direction}
    with FileLock(str(lock)):
        for attempt in range(3):
            try:
                study = optuna.create_study(study_name=name, storage=url, load_if_exists=True, **directions)
                break
            except Exception:  # noqa: BLE001 (another machine created the tables or the study meanwhile)
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
        fail_interrupted_trials(study)


def number_jobs_by_trial() -> None:
    """Hydra's Optuna sweeper numbers its jobs from 0 each time it starts, while a continued study
    numbers its trials on (and several workers on one storage interleave theirs): each job is given
    its trial's number (``OPTUNA_TRIAL``), which names its folder (``conf/hydra/default.yaml``), and
    each trial records the sweep folder its job runs in (for ``fail_interrupted_trials``)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    configure = OptunaSweeperImpl._configure_trials
    if getattr(configure, "by_trial", False):
        return

    def configure_trials(self, trials, *args):
        overrides = configure(self, trials, *args)
        sweep_dir = str(Path(self.config.hydra.sweep.dir).resolve())
        for trial in trials:
            trial.set_user_attr(SWEEP_DIR_ATTR, sweep_dir)
        return [(*job, f"++hydra.job.env_set.{OPTUNA_TRIAL}={trial.number}") for job, trial in zip(overrides, trials)]

    configure_trials.by_trial = True
    OptunaSweeperImpl._configure_trials = configure_trials


def interrupted_trial_folder(trial) -> Path | None:
    """The folder of a trial that a stopped sweep left RUNNING: its job claimed the folder (it records a
    plan), has no result (metrics.json) and no live process holds it. None where a live worker may
    still run the trial: its folder not made or not claimed yet, held, or finished (the result is
    told to the study after the job, for a batch after its last job)."""
    sweep_dir = trial.user_attrs.get(SWEEP_DIR_ATTR)
    if not sweep_dir or not Path(sweep_dir).is_dir():
        return None
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and job_number(p.name) == trial.number]
    if len(folders) != 1:
        return None
    folder = folders[0]
    claimed = (folder / PLAN_FILE).is_file() and not (folder / "metrics.json").exists()
    return folder if claimed and not held(folder) else None


def fail_interrupted_trials(study) -> None:
    """A sweep stopped while a trial ran (Ctrl-C, kill, a pre-emption) leaves the trial RUNNING in the
    study's storage, where nothing would end it: when the study continues, such a trial is marked
    failed (its folder is left as it is, checkpoints included). A trial a live worker may be running
    is left alone (``interrupted_trial_folder``)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        folder = interrupted_trial_folder(trial)
        if folder is None:
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except RuntimeError:  # it ended meanwhile
            continue
        log.warning("trial %d was left running by a sweep that stopped (%s): marked failed in the study; its "
                    "folder is kept as it is", trial.number, folder)


def tolerate_the_grid_samplers_stop() -> None:
    """Hydra's Optuna sweeper asks and tells trials outside ``study.optimize``, where Optuna's grid
    sampler, told of the grid's last trial, calls ``study.stop()``, which then raises. The sweeper
    ignores that error for a trial that completed, not for one that failed (a job refused before it
    ran reports no loss), so a grid whose last trial failed ended its sweep in a traceback: the
    same error is ignored here for both."""
    from optuna.samplers import GridSampler

    told = GridSampler.after_trial
    if getattr(told, "tolerates_stop", False):
        return

    def after_trial(self, study, trial, state, values):
        try:
            told(self, study, trial, state, values)
        except RuntimeError as err:
            if "`Study.stop` is supposed to be invoked" not in str(err):
                raise

    after_trial.tolerates_stop = True
    GridSampler.after_trial = after_trial


def no_accounting_noise(record: logging.LogRecord) -> bool:
    return "Bypassing sacct error" not in record.getMessage()


def quiet_without_accounting() -> None:
    """The submitit launcher asks SLURM's accounting (sacct) for its jobs' states every few seconds.
    A cluster that keeps no accounting answers each time with an error on the console, and submitit
    then reads the jobs' result files instead, which is all it can do: there, it asks nothing."""
    logging.getLogger("submitit").addFilter(no_accounting_noise)
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    if re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none", config, re.MULTILINE):
        from submitit.slurm.slurm import SlurmInfoWatcher

        SlurmInfoWatcher._make_command = lambda self: None  # no sacct call: states come from the result files


def job_number(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def job_results(sweep_dir: Path) -> dict[str, dict | None]:
    """Each job's folder name (its number first) -> the record of a failure beside its folder (a job
    that failed before it owned the folder may have none), else its metrics.json (None: none written)."""
    names = {p.name for p in sweep_dir.iterdir() if p.is_dir()}
    names |= {p.name.removesuffix(".refused.json") for p in sweep_dir.glob("*.refused.json")}
    results = {}
    for name in sorted((n for n in names if job_number(n) is not None), key=job_number):
        job = sweep_dir / name
        results[name] = read_json(refusal_file(job)) or read_json(job / "metrics.json")
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
            lines.append(f"  {job}: no metrics.json (stopped or killed before it ended)")
        else:
            lines.append(f"  {job} {metrics['status']}: {metrics['error']}")
    failed = any(m is None or m.get("status") in ("failed", "refused") for m in bad.values())
    return "\n".join(lines), failed


class SweepReport(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): when a sweep starts, which keys it varies (for
    the job folders' names); after it, the summary, and exit status 1 when a job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ[SWEPT_KEYS] = ",".join(swept_keys(config))
        if config.hydra.sweeper.get("direction") and get_class(config.model._target_).kind == "image":
            require_weights(config.paths.get("inception_weights"))  # the study minimises FID: none, no study
        os.environ[SWEEP_COMMAND] = continue_command(config)
        prepare_study(config.hydra.sweeper)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():
            tolerate_the_grid_samplers_stop()
            number_jobs_by_trial()
        if "submitit" in str(config.hydra.launcher.get("_target_", "")).lower():
            quiet_without_accounting()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        text, failed = summary(sweep_dir)
        print(text, file=sys.stderr if failed else sys.stdout)
        if failed:
            sys.exit(1)
