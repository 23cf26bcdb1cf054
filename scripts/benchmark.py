"""Framework overhead, measured: the project's training path against a plain PyTorch loop of the
same network, batches and optimizer, in one process.

    python scripts/benchmark.py model=mlp [steps=6000] [any train.py override ...]

Prints both speeds in optimizer updates per second (and tokens/s), and ``ratio=<framework/plain>``
on the last line. The framework side runs with logging (TensorBoard), the progress bar,
validation and checkpointing on, exactly as ``train.py`` builds them.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from genlab.train import CONF_DIR, build_model, build_trainer

# the configuration each model is benchmarked at, unless overridden on the command line
PRESETS = {
    "mlp": ["experiment=notebook_mlp", "val_every=2000"],
    "bigram": ["model.counting=false", "data.batch_size=4", "val_every=2000"],
}


class Clock(L.Callback):
    """Starts the clock after ``warmup`` Lightning steps (set-up and first-step costs excluded)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start_time = self.start_step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start_time is None and trainer.fit_loop.epoch_loop._batches_that_stepped >= self.warmup:
            self.start_time, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start_time
        self.updates = trainer.global_step - self.start_step


class Replay:
    """An iterable over a list (Lightning would read a bare list as a list of loaders)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class FixedTrainData(L.LightningDataModule):
    """The given training items, in order; validation from the real data module."""

    def __init__(self, items, real):
        super().__init__()
        self.items, self.real = items, real

    def train_dataloader(self):
        return Replay(self.items)

    def val_dataloader(self):
        return self.real.val_dataloader()


def framework_speed(cfg, model, datamodule, batches, run_dir):
    k = model.updates_per_step
    items = [pack(batches[i : i + k]) for i in range(0, len(batches) - k + 1, k)]
    with open_dict(cfg):
        cfg.trainer.max_steps = len(items) * k
        cfg.paths.output_dir = str(run_dir)
    trainer = build_trainer(cfg, run_dir, k)
    clock = Clock(warmup=max(1, len(items) // 10))
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=FixedTrainData(items, datamodule))
    return clock.updates / clock.seconds


def pack(batches):
    """Single batches -> one training item (xs, ys, widths), as the data modules group them."""
    width = max(x.shape[1] for x, _ in batches)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
    xs = torch.stack([pad(x, 0) for x, _ in batches])
    ys = torch.stack([pad(y, -1) for _, y in batches])
    return xs, ys, torch.tensor([x.shape[1] for x, _ in batches])


def plain_speed(model, cfg, batches):
    """The same network and optimizer in the loop a PyTorch user would write by hand."""
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameter_groups())
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer=optimizer)
    model.train()
    warmup = len(batches) // 10
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (len(batches) - warmup) / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    overrides = [a for a in argv if not a.startswith("steps=")]
    steps = int(next((a.split("=", 1)[1] for a in argv if a.startswith("steps=")), 6000))
    model_name = next((a.split("=", 1)[1] for a in overrides if a.startswith("model=")), "mlp")
    overrides = PRESETS.get(model_name, []) + overrides
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["hydra.run.dir=."], return_hydra_config=False)
    torch.manual_seed(cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    batches = []  # single batches, as a plain loop sees them
    while len(batches) < steps:
        batches.extend(b for item in datamodule.train_dataloader() for b in model.unpack(item))
    batches = batches[:steps]
    tokens_per_update = sum(int((y >= 0).sum()) for _, y in batches) / len(batches)
    print(f"benchmark: model={model_name} {' '.join(overrides)}; {steps} updates, "
          f"{tokens_per_update:.1f} target tokens per update, {torch.get_num_threads()} threads")

    results = {"plain": [], "framework": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):  # alternate, keep the best of each: the machine's noise hits both
            results["plain"].append(plain_speed(copy.deepcopy(model), cfg, batches))
            results["framework"].append(
                framework_speed(copy.deepcopy(cfg), copy.deepcopy(model), datamodule, batches, Path(tmp) / str(round_))
            )
    plain, framework = max(results["plain"]), max(results["framework"])
    print(f"plain PyTorch loop: {plain:9.1f} updates/s  {plain * tokens_per_update:11.0f} tokens/s")
    print(f"genlab (Lightning): {framework:9.1f} updates/s  {framework * tokens_per_update:11.0f} tokens/s")
    print(f"ratio={framework / plain:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
