"""``make reproduce``: every experiment of the course in one folder, then its report.

The course's presets are swept with Hydra's multirun, through whatever launcher the user chooses
(the basic one by default, ``hydra/launcher=slurm`` or ``parallel``), one multirun per group of
presets that share their sweep: the notebook MLP and WaveNet over three seeds, the other presets
once each, and the notebook GPT on a GPU when there is one. A multirun sweeps the cartesian product
of its overrides (``experiment=a,b seed=0,1,2`` is six jobs), and Hydra's basic sweeper has no way
to give the seeds to some presets only; separate multiruns under one folder do, and each is still a
plain ``python train.py -m`` command a user can read and run alone. The report reads the folder
whole, so the groups meet again there.

Everything else is genlab's sweep machinery (genlab.sweeps): run again over the same folder, the
command continues (finished jobs kept, interrupted ones resumed); a failing job is recorded in its
folder and the others go on; each multirun's summary says what did not complete."""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genlab.errors import ConfigError
from genlab.run.outputs import write_metrics
from genlab.loop.precision import cpu_name
from genlab.run.runtime import CONF_DIR

ROOT = Path(CONF_DIR).parent  # train.py's folder
USAGE = ("usage: python scripts/reproduce.py [quick=true] [dir=FOLDER] [gpu=auto|true|false] "
         "[any train.py override, e.g. hydra/launcher=slurm]")


@dataclass(frozen=True)
class Group:
    """Presets swept together, with the overrides they share."""
    name: str
    presets: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    needs_gpu: bool = False


COURSE = (
    Group("seeds", ("notebook_mlp", "notebook_wavenet"), ("seed=0,1,2",)),
    Group("once", ("notebook_bigram", "notebook_trigram", "names_lstm", "names_gru", "divina_gpt_cpu",
                   "shakespeare_gpt_cpu", "faces_dcgan_cpu")),
    Group("gpu", ("notebook_gpt",), ("trainer=gpu",), needs_gpu=True),
)
# quick=true: a few updates of every experiment (the counting tables make their one pass), one
# validation, at the end (a GPT's costs more than its 20 updates), and a training-curve point every
# 5 updates, to check a machine end to end
QUICK = ("trainer.max_steps=20", "val_every=20", "trainer.log_every_n_steps=5")
OWN_KEYS = ("quick", "dir", "gpu")


def parse(args: list[str]) -> tuple[dict, list[str]]:
    """reproduce.py's own settings (quick, dir, gpu) and the overrides passed on to train.py."""
    own = {"quick": "false", "dir": None, "gpu": "auto"}
    passed = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key in OWN_KEYS and sep:
            own[key] = value
        elif arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        else:
            passed.append(arg)
    for key, allowed in (("quick", ("true", "false")), ("gpu", ("auto", "true", "false"))):
        if own[key] not in allowed:
            raise ConfigError(f"{key}={own[key]}: give {' or '.join(allowed)}\n{USAGE}")
    return own, passed


def commit() -> tuple[str | None, bool]:
    """The checkout's commit (None outside a git checkout) and whether its tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, False


def default_folder(quick: bool) -> Path:
    """One folder per commit, so that the same command run again continues it."""
    head, _ = commit()
    return ROOT / "outputs" / "reproduce" / (f"{head or 'no-git'}{'-quick' if quick else ''}")


def commands(folder: Path, quick: bool, gpu: bool, passed: list[str]) -> list[tuple[str, list[str]]]:
    """Each group's train.py multirun: its name and its arguments."""
    out = []
    for group in COURSE:
        if group.needs_gpu and not gpu:
            continue
        args = ["train.py", "-m", f"experiment={','.join(group.presets)}", *group.overrides,
                *(QUICK if quick else ()), *passed, f"hydra.sweep.dir={folder / group.name}"]
        out.append((group.name, args))
    return out


def reproduce(args: list[str]) -> int:
    """Run the course's multiruns, then write the report; the exit status is 1 if a job failed."""
    from genlab.results.report import write_report  # matplotlib and Jinja2 only once the runs are done

    own, passed = parse(args)
    quick = own["quick"] == "true"
    gpu = torch.cuda.is_available() if own["gpu"] == "auto" else own["gpu"] == "true"
    folder = Path(own["dir"]).resolve() if own["dir"] else default_folder(quick)
    folder.mkdir(parents=True, exist_ok=True)
    head, dirty = commit()
    record = {"command": shlex.join(["python", "scripts/reproduce.py", *args]), "commit": head,
              "uncommitted_changes": dirty, "torch": torch.__version__, "quick": quick,
              "driver_cpu": cpu_name(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "groups": {}}
    failed = []
    for name, group_args in commands(folder, quick, gpu, passed):
        print(f"reproduce: {shlex.join(['python', *group_args])}", flush=True)
        began = time.perf_counter()
        status = subprocess.run([sys.executable, *group_args], cwd=ROOT).returncode
        record["groups"][name] = {"command": shlex.join(["python", *group_args]), "exit_status": status,
                                  "seconds": round(time.perf_counter() - began, 1)}
        if status != 0:  # the sweep's summary named the jobs; the next group still runs
            failed.append(name)
    write_metrics(folder / "reproduce.json", record)
    page = write_report(folder)
    print(f"reproduce: {'some jobs did not complete (' + ', '.join(failed) + ')' if failed else 'every job completed'}; "
          f"report: {page}")
    return 1 if failed else 0
