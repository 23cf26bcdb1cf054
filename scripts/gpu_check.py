"""``make gpu-check``: a short, offline check of genlab on one CUDA GPU (data from the mirror).

Runs, each through ``genlab.train.train`` in this process:

- ``experiment=notebook_gpt trainer=gpu`` for ``GPT_UPDATES`` updates, eager and with ``model.compile=true``;
- ``experiment=notebook_dcgan trainer=gpu`` for ``DCGAN_STEPS`` steps;

and prints one line each: tokens/s and MFU (bf16 peak of the card) for the GPT, images/s for the
DCGAN, and the peak GPU memory. Speeds are steady-state: timed (``SteadyClock``) from a third of the
way in to the last update, GPU work finished at both ends, so compilation and warm-up are left out. A run that fails prints its traceback in full and the check goes on;
the exit status is 1 if any failed. Without CUDA it says so in one line and exits 1.
Runs write into a temporary folder."""

from __future__ import annotations

import json
import os
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
    "notebook_gpt compiled": ["experiment=notebook_gpt", f"trainer.max_steps={GPT_UPDATES}", "model.compile=true"],
    "notebook_gpt compiled, CUDA graphs": ["experiment=notebook_gpt", f"trainer.max_steps={GPT_UPDATES}",
                                           "model.compile=reduce-overhead"],
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


def run(name: str, overrides: list[str], out: Path) -> bool:
    from hydra import compose, initialize_config_dir

    from genlab.checkpoints import load_model
    from genlab.models.base import peak_flops
    from genlab.train import CONF_DIR, train

    run_dir = out / name.replace(" ", "_")
    torch.cuda.reset_peak_memory_stats()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, *COMMON, f"paths.output_dir={run_dir}"])
        train(cfg)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        model, checkpoint = load_model(run_dir / "checkpoints" / "last.ckpt")
        flops = model.flops_per_token() if hasattr(model, "flops_per_token") else None
        rate = SteadyClock.latest.rate
        if rate is None:
            raise RuntimeError("the run made too few Lightning steps to time after its warm-up; raise its steps")
        print(result_line(name, rate, metrics, flops, peak_flops(torch.device("cuda")), torch.cuda.max_memory_allocated(),
                          checkpoint.get("genlab", {}).get("updates_per_step")), flush=True)
        return True
    except BaseException:  # everything, SystemExit included: the report goes on with the next run
        print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
        return False


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it where there is one")
        return 1
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    print(f"gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        passed = [run(name, overrides, Path(out)) for name, overrides in RUNS.items()]
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
