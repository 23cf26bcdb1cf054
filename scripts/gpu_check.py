"""``make gpu-check``: a short, offline check of genlab on one CUDA GPU (data from the mirror).

Runs, each through ``genlab.cli.train.train`` in this process, with ``trainer=gpu`` (its precision
chosen by the card, ``loop.updates_per_step: auto`` timed on it):

- ``experiment=notebook_gpt`` for ``GPT_UPDATES`` updates: eager, with ``loop.compile=true`` (the
  whole update compiled as one graph) and with ``loop.compile=reduce-overhead`` (CUDA graphs);
- ``experiment=notebook_dcgan`` for ``DCGAN_STEPS`` steps: with ``data.num_workers=auto`` and with 4;

The first line names the card, its compute capability and the precision chosen, torch's version
and genlab's commit; then one line per run: tokens/s and MFU (the card's bf16 peak) for the GPT,
images/s for the DCGAN, the peak GPU memory, the count ``auto`` chose, and the run's wall time
with start-up and compilation. Speeds are steady-state: timed (``SteadyClock``) from a third of
the way in to the last update, GPU work finished at both ends, so compilation and warm-up are
left out. A run that fails prints its traceback in full and the check goes on; the exit status
is 1 if any failed. Without CUDA it says so in one line and exits 1. Runs write into a temporary
folder."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import torch

GPT_UPDATES = 300
DCGAN_STEPS = 300
RUNS = {
    "notebook_gpt": ["experiment=notebook_gpt", f"trainer.max_steps={GPT_UPDATES}"],
    "notebook_gpt compiled": ["experiment=notebook_gpt", f"trainer.max_steps={GPT_UPDATES}", "loop.compile=true"],
    "notebook_gpt compiled, CUDA graphs": ["experiment=notebook_gpt", f"trainer.max_steps={GPT_UPDATES}",
                                           "loop.compile=reduce-overhead"],
    "notebook_dcgan": ["experiment=notebook_dcgan", f"trainer.max_steps={DCGAN_STEPS}"],  # num_workers=auto
    # the same with half auto's ceiling of JPEG-decoding workers: does decoding hold the GPU back?
    "notebook_dcgan 4 workers": ["experiment=notebook_dcgan", f"trainer.max_steps={DCGAN_STEPS}", "data.num_workers=4"],
}


class SteadyClock(L.Callback):
    """Times training from ``warmup`` of the way in to the last update (images or tokens per second),
    with the GPU's queued work finished at both ends. The latest instance is ``SteadyClock.latest``."""

    latest: SteadyClock | None = None

    def __init__(self, warmup: float = 1 / 3):
        self.warmup = warmup
        self.start = self.rate = None
        SteadyClock.latest = self

    @staticmethod
    def seen(model) -> int:
        return getattr(model, "tokens_seen", None) or getattr(model, "images_seen", 0)

    @staticmethod
    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup * trainer.max_steps:
            self.start = (self.now(), self.seen(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None and trainer.global_step >= trainer.max_steps:
            seconds, count = self.now() - self.start[0], self.seen(pl_module) - self.start[1]
            self.rate = count / seconds if seconds > 0 and count > 0 else None


# the same for every run: the GPU, one validation at the end, no pictures or samples to slow the
# clock; SteadyClock (its import path: this file may run as __main__ or be imported)
COMMON = ["trainer=gpu", "val_every=100000", "callbacks.insight=null", "num_samples=0", "logger=none",
          f"+callbacks.steady_clock._target_={SteadyClock.__module__}.SteadyClock"]


def result_line(name: str, rate: float, metrics: dict, flops_per_token: float | None, peak_flops: float | None,
                peak_memory: int, updates_per_step: int | None = None) -> str:
    """One line of the check's report: the steady rate, and the run's metrics.json."""
    memory = f"peak GPU memory {peak_memory / 2**30:.1f} GiB"
    if updates_per_step:
        memory += f", {updates_per_step} updates per Lightning step"
    if "tokens_per_second" in metrics:
        speed = f"{rate:,.0f} tokens/s"
        if flops_per_token and peak_flops:
            speed += f", MFU {flops_per_token * rate / peak_flops:.1%}"
        return f"{name}: {speed}, val {metrics['val_loss']:.3f}, {memory}"
    return f"{name}: {rate:,.0f} images/s, {memory}"


def run_config(name: str, out: Path):
    """The config of the run ``name`` of ``RUNS``, writing into a folder of ``out``."""
    from hydra import compose, initialize_config_dir

    from genlab.run.runtime import CONF_DIR

    folder = out / "".join(c if c.isalnum() else "_" for c in name)  # a comma would be a Hydra sweep
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*RUNS[name], *COMMON, f"paths.output_dir={folder}"])


def run(name: str, out: Path) -> bool:
    from genlab.run.checkpoints import load_model
    from genlab.models.base import peak_flops
    from genlab.cli.train import train

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        cfg = run_config(name, out)
        run_dir = Path(cfg.paths.output_dir)
        train(cfg)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        model, checkpoint = load_model(run_dir / "checkpoints" / "last.ckpt")
        flops = model.flops_per_token() if hasattr(model, "flops_per_token") else None
        rate = SteadyClock.latest.rate
        if rate is None:
            raise RuntimeError("the run made too few Lightning steps to time after its warm-up; raise its steps")
        line = result_line(name, rate, metrics, flops, peak_flops(torch.device("cuda")),
                           torch.cuda.max_memory_allocated(), checkpoint.get("genlab", {}).get("updates_per_step"))
        print(f"{line}; {time.perf_counter() - started:.0f} s in all", flush=True)
        return True
    except BaseException:  # everything, SystemExit included: the report goes on with the next run
        print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
        return False


def commit() -> str:
    """genlab's commit (``-dirty`` with uncommitted changes), for the record a figure comes from."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "an unknown commit"
    return f"commit {done.stdout.strip()}" if done.returncode == 0 else "an unknown commit (not a git checkout)"


def header() -> str:
    from genlab.loop.precision import card_precision

    major, minor = torch.cuda.get_device_capability()
    return (f"gpu-check on {torch.cuda.get_device_name()} (compute capability {major}.{minor}: "
            f"{card_precision()[0]}), torch {torch.__version__}, genlab at {commit()}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where there is one")
        return 1
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    print(header(), flush=True)
    with tempfile.TemporaryDirectory() as out:
        passed = [run(name, Path(out)) for name in RUNS]
    return 0 if all(passed) else 1


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.exit(main())
