"""The folder rules as invariants over random sequences of operations (issue 34): seeded sequences
of runs and sweeps with identical, changed and bad settings, interrupted by SIGINT, SIGTERM or
SIGKILL at random points, resumed, continued (ckpt_path=) and overwritten. After every step:

- a completed run's metrics.json and checkpoints are byte for byte as they were, unless the step
  replaced it (overwrite=true) or continued it explicitly (ckpt_path=, for more updates);
- the plan a folder records (.hydra/plan.json) is the one its last checkpoint trained under (or, for
  an explicit continuation not yet saved, the one it continues, which the record names);
- no temporary file of a killed save outlives the next start of that run.

GENLAB_PLAN_STEPS=200 runs 200 steps (default 20); GENLAB_PLAN_SEED picks another sequence."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose_config

from genlab.errors import GenlabError
from genlab.run.outputs import TEMPORARY
from genlab.cli.train import train

STEPS = int(os.environ.get("GENLAB_PLAN_STEPS", 20))
SEED = int(os.environ.get("GENLAB_PLAN_SEED", 34))
SIGNAL = "GENLAB_TEST_PLAN_SIGNAL"  # "<folder name>:<signal number>:<batch>": EnvSignal's target
# the tiniest run that validates and checkpoints: 4 Lightning steps of 5 updates
TINY = ["model=mlp", "model.n_embd=2", "model.n_hidden=8", "loop.updates_per_step=5", "val_every=10",
        "data.batch_size=8", "num_samples=0", "logger=csv", "callbacks.insight=null", "threads=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"+callbacks.kill._target_={__name__}.EnvSignal"]


class EnvSignal(L.Callback):
    """Sends a signal at a training batch of the run whose folder ``$GENLAB_TEST_PLAN_SIGNAL`` names, so
    that every command of a sequence has the same configuration (the same plan) whether it is
    interrupted or not."""

    def setup(self, trainer, pl_module, stage):
        target = os.environ.get(SIGNAL, "")
        folder, _, rest = target.partition(":")
        self.armed = folder == Path(trainer.default_root_dir).name
        self.signum, self.at = (int(x) for x in rest.split(":")) if self.armed else (0, 0)
        self.seen = 0

    def on_train_batch_end(self, *args):
        self.seen += 1
        if self.armed and self.seen == self.at:
            signal.raise_signal(self.signum)


def result_files(folder: Path) -> dict[str, bytes]:
    files = [folder / "metrics.json", *sorted((folder / "checkpoints").glob("*.ckpt"))]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def completed(folder: Path) -> bool:
    try:
        return json.loads((folder / "metrics.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMPORARY.match(p.name)]


def check_plan_matches_checkpoint(folder: Path) -> None:
    try:
        plan = json.loads((folder / ".hydra" / "plan.json").read_text())
        checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    except (OSError, ValueError, RuntimeError):
        return  # a folder with no plan or no checkpoint yet (killed before either) holds nothing to match
    allowed = {plan["identity"], (plan.get("continues") or {}).get("from")}
    assert checkpoint.get("genlab_plan") in allowed, f"{folder}: its checkpoint trained under another plan"


def settings(rng: random.Random) -> list[str]:
    """Mostly the same settings (a run met again), sometimes another (a changed plan) or a bad one."""
    return [f"optimizer.lr={rng.choices(['0.05', '0.1'], weights=[4, 1])[0]}",
            f"trainer.max_steps={rng.choices([20, 40], weights=[4, 1])[0]}",
            f"seed={rng.choices(['1', '1.5'], weights=[9, 1])[0]}"]  # 1.5: refused (seed must be a whole number)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_random_sequences_of_runs_sweeps_and_interruptions_keep_every_result(names_file, tmp_path, monkeypatch):
    rng = random.Random(SEED)
    # one SLURM job throughout: a command may meet its own run again (kept, resumed) with the same plan
    monkeypatch.setenv("SLURM_JOB_ID", "34")
    for name in ("SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    singles = [tmp_path / "runs" / name for name in ("a", "b")]
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    data = [f"data.path={names_file}", f"paths.data_dir={tmp_path / 'data'}"]
    kept: dict[Path, dict] = {}  # a completed run's files, as they must stay
    seen = {"kill": 0, "signal": 0, "sweep": 0, "kept": 0, "refused": 0, "overwrite": 0, "continue": 0}

    for step in range(STEPS):
        kind = rng.choices(["run", "sweep", "kill"], weights=[8, 1, 1])[0]
        args = settings(rng)
        replaced: set[Path] = set()  # folders this step may legitimately change
        if kind == "sweep":
            seen["sweep"] += 1
            subprocess.run([sys.executable, "train.py", "-m", *TINY, *data, *args, "name=x,y",
                            f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, capture_output=True, timeout=600)
        else:
            folder = rng.choice(singles)
            extra = []
            if rng.random() < 0.1:
                extra = ["overwrite=true"]
                seen["overwrite"] += 1
            elif rng.random() < 0.15 and (folder / "checkpoints" / "last.ckpt").exists():
                extra = [f"ckpt_path={folder}"]  # a continuation, for more updates where max_steps allows
                seen["continue"] += 1
            if extra:
                replaced.add(folder)
            if kind == "kill":
                seen["kill"] += 1
                process = subprocess.Popen([sys.executable, "train.py", *TINY, *data, *args, *extra,
                                            f"hydra.run.dir={folder}"], cwd=REPO, env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(2, 12))  # anywhere: at start-up, in training, in a save, after the end
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
            else:
                interrupt = rng.random() < 0.3
                if interrupt:
                    seen["signal"] += 1
                    monkeypatch.setenv(SIGNAL, f"{folder.name}:{int(rng.choice([signal.SIGINT, signal.SIGTERM]))}:"
                                               f"{rng.randint(1, 3)}")
                else:
                    monkeypatch.delenv(SIGNAL, raising=False)
                was = result_files(folder) if completed(folder) else None
                try:
                    train(compose_config([*TINY, *data, *args, *extra], folder))
                except GenlabError:
                    seen["refused"] += 1
                except SystemExit as stop:  # a signal: saved, exit 128 + signal
                    assert stop.code in (130, 143)
                else:
                    if was is not None and was == result_files(folder) and not extra:
                        seen["kept"] += 1
                    assert not temporaries(folder), f"step {step}: a temporary file outlived the run's start"
        # the invariants, over every folder
        for folder in [*singles, *(p for p in sweep.iterdir() if p.is_dir())] if sweep.exists() else singles:
            if folder in kept and folder not in replaced:
                assert result_files(folder) == kept[folder], f"step {step} ({kind} {args}): {folder}'s result changed"
            if completed(folder):
                kept[folder] = result_files(folder)
            else:
                kept.pop(folder, None)
            check_plan_matches_checkpoint(folder)
    print(f"{STEPS} steps: {seen}")
    assert seen["refused"] and seen["signal"] and kept  # the sequence met the cases it is about
