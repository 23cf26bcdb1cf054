"""Framework overhead, measured: the project's training path against a plain PyTorch loop of the
same network, batches and optimizer, in one process.

    python scripts/benchmark.py model=mlp [steps=6000] [rounds=4] [any train.py override ...]
    python scripts/benchmark.py --table   # make benchmark-table: every CPU row of docs/performance.md

``model=`` names a benchmark of ``PRESETS`` (each sets its model and data): mlp, bigram, wavenet,
gpt (divina_gpt_cpu), shakespeare_gpt (nanoGPT's CPU recipe), lstm, gru, dcgan.

Prints both speeds in optimizer updates per second and tokens/s (the DCGAN: images/s; the GPT
also the achieved FLOP/s against this machine's measured matmul FLOP/s), the validation loss each
side reaches after the same updates (``loop.compile=true`` must train the same model as the eager
loop, within noise), and on the last line ``ratio=<framework/plain>``: the median of the rounds'
ratios (one round that the machine's other work slows does not move it). Each side goes first in
every other round (whichever runs first in a round tends to be faster on a shared machine), so
an even number of rounds balances the order. With ``loop.compile=true`` where the whole update
compiles, a third side runs the plain loop with the compiled update in place of the eager one: the
compiled graph's speed without the framework around it. The framework
side runs with logging (TensorBoard), the progress bar, validation, checkpointing and the insight
callback on, exactly as ``train.py`` builds them; its clock leaves validation out, as the plain loop
validates only after its clock stops. It prints the time spent inside the insight callback as a
share of training time.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from genlab.callbacks import TrainingClock
from genlab.insight import Insight
from genlab.models.compiled_update import CompiledUpdate
from genlab.loop.precision import resolve_precision
from genlab.loop.steps import batches_of, fit, resolve_updates_per_step
from genlab.run.runtime import skip_failing_nvml_check
from genlab.cli.train import CONF_DIR, build_model, build_trainer
from genlab.data.module import ready

# the configuration each model is benchmarked at, unless overridden on the command line
PRESETS = {
    "mlp": ["experiment=notebook_mlp", "val_every=2000"],
    "bigram": ["model=bigram", "model.counting=false", "data.batch_size=4", "val_every=2000", "rounds=8"],
    # more, shorter rounds for the presets whose rounds' ratios swing most (docs/performance.md)
    "wavenet": ["experiment=notebook_wavenet", "val_every=2000", "steps=2000", "rounds=12"],
    "gpt": ["experiment=divina_gpt_cpu", "val_every=100000", "steps=120", "rounds=1"],
    "shakespeare_gpt": ["experiment=shakespeare_gpt_cpu", "val_every=100000", "steps=300", "rounds=6"],
    "lstm": ["experiment=names_lstm", "val_every=1000"],
    "gru": ["experiment=names_gru", "val_every=1000"],
    "dcgan": ["experiment=notebook_dcgan", "steps=12", "rounds=2"],
}


class Clock(TrainingClock):
    """Training time from ``warmup`` Lightning steps on (set-up and first-step costs excluded) to the
    last update, validation apart as in ``metrics.json``'s ``update_seconds``: the plain loop does
    no validation, so the framework's is not timed either (it still runs, with its checkpoints)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.start_step = None
        self.steps_begun = 0  # Lightning steps begun in this fit

    def on_train_start(self, trainer, pl_module):
        pass  # the clock starts after the warm-up steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.resume()
        if self.started is None and self.steps_begun >= self.warmup:
            self.started, self.start_step = time.perf_counter(), trainer.global_step
        self.steps_begun += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the clock stops after the last update, before the final validation
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started - self.paused
            self.updates = trainer.global_step - self.start_step

    def on_train_end(self, trainer, pl_module):
        pass  # seconds as of the last update


class Replay:
    """An iterable over a list (Lightning would read a bare list as a list of loaders)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class FixedTrainData(L.LightningDataModule):
    """The given training batches, in order."""

    def __init__(self, items):
        super().__init__()
        self.items = items

    def train_dataloader(self):
        return Replay(self.items)


class FixedTrainRealValidation(FixedTrainData):
    """The given training batches; validation from the real data module."""

    def __init__(self, items, real):
        super().__init__(items)
        self.real = real
        self.tokenizer = real.tokenizer  # what the samples after each validation are decoded with

    def val_dataloader(self):
        return self.real.val_dataloader()

    def split_tokens(self, split):
        return self.real.split_tokens(split)

    def training_widths(self):
        return self.real.training_widths()


def framework_speed(cfg, model, datamodule, batches, run_dir, k: int):
    """``k`` updates per Lightning step (``len(batches)`` a multiple of it: both sides train alike)."""
    with open_dict(cfg):
        cfg.trainer.max_steps = len(batches)
        cfg.trainer.max_epochs = -1
        cfg.paths.output_dir = str(run_dir)
    trainer = build_trainer(cfg, run_dir, k, validates=model.kind == "text")
    clock = Clock(warmup=max(1, len(batches) // k // 10))
    trainer.callbacks.append(clock)
    data = FixedTrainRealValidation(batches, datamodule) if model.kind == "text" else FixedTrainData(batches)
    fit(trainer, model, data, k)
    speed = clock.updates / clock.seconds
    val = trainer.callback_metrics.get("loss/val")  # measured after the last update (ValidateAtEnd)
    insight = next((c for c in trainer.callbacks if isinstance(c, Insight)), None)
    if insight is not None:  # the callback's own time, over all updates (at the measured speed)
        training = trainer.global_step / speed
        print(f"insight callback: {insight.seconds:.3f} s of {training:.1f} s of training = {insight.seconds / training:.1%}")
    return speed, None if val is None else float(val)


def loop_speed(model, cfg, batches, datamodule, make_update):
    """Updates/s of a hand-written loop: ``make_update(model, optimizer)`` gives the update for a
    batch; the scheduler steps after each; the first tenth is warm-up. And the validation loss."""
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameter_groups())
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer=optimizer)
    model.train()
    update = make_update(model, optimizer)
    warmup = len(batches) // 10
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        update(x, y)
        scheduler.step()
    return (len(batches) - warmup) / (time.perf_counter() - start), validation_loss(model, datamodule)


def plain_speed(model, cfg, batches, datamodule):
    """The same network and optimizer in the loop a PyTorch user would write by hand."""

    def eager_update(model, optimizer):
        clip = model.loop.grad_clip

        def update(x, y):
            logits = model.training_forward(x, y)  # the model's forward (WaveNet: with the padding mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()

        return update

    return loop_speed(model, cfg, batches, datamodule, eager_update)


def compiled_loop_speed(model, cfg, batches, datamodule):
    """The plain loop with ``loop.compile``'s whole-update graph in place of its eager update: what
    the compiled update reaches without the framework around it (the ceiling for genlab's side)."""

    def compiled_update(model, optimizer):
        return CompiledUpdate(model, optimizer, model.loop.grad_clip, datamodule.training_widths(),
                              model.compile_mode())

    return loop_speed(model, cfg, batches, datamodule, compiled_update)


@torch.no_grad()
def validation_loss(model, datamodule) -> float:
    """The mean loss per target token over the validation split, as genlab's validation computes it."""
    model.eval()
    summed = count = 0
    for x, y in datamodule.val_dataloader():
        summed += float(model.loss(model(x), y, reduction="sum"))
        count += int((y >= 0).sum())
    return summed / count


def plain_gan_speed(model, cfg, batches, datamodule):
    """The DCGAN's step as the notebook writes it: a discriminator update on a real and a fake
    batch, then a generator update, with BCE on the discriminator's logits."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    make = hydra.utils.instantiate(cfg.model.optimizer)
    d_opt, g_opt = make(params=model.discriminator.parameters()), make(params=model.generator.parameters())
    model.train()
    warmup = max(1, len(batches) // 10)
    for i, real in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
        fake = model.generator(torch.randn(len(real), model.hparams.nz, 1, 1))
        loss_d = bce(model.discriminator(real), ones) + bce(model.discriminator(fake.detach()), zeros)
        d_opt.zero_grad(set_to_none=True)
        loss_d.backward()
        d_opt.step()
        loss_g = bce(model.discriminator(fake), ones)
        g_opt.zero_grad(set_to_none=True)
        loss_g.backward()
        g_opt.step()
    return (len(batches) - warmup) / (time.perf_counter() - start), None


@functools.cache
def matmul_flops(n: int = 2048, repeats: int = 10, tries: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s (a large square matmul on all threads): the best of ``tries``
    timings, as the sides' speeds are their best rounds, measured once for every row of a table."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def option(args: list[str], key: str, default):
    """The last ``key=value`` in ``args`` (the command line comes after the presets)."""
    return type(default)(next((a.split("=", 1)[1] for a in reversed(args) if a.startswith(key + "=")), default))


def measure(argv: list[str]) -> dict:
    """One benchmark (``argv`` as on the command line), printed as it goes; returns its figures."""
    model_name = option(argv, "model", "mlp")
    if model_name not in PRESETS:
        raise SystemExit(f"model={model_name}: no such benchmark; use one of {', '.join(PRESETS)}")
    args = PRESETS[model_name] + [a for a in argv if not a.startswith("model=")]  # the preset sets the model
    steps, rounds = option(args, "steps", 6000), option(args, "rounds", 4)
    overrides = [a for a in args if not a.startswith(("steps=", "rounds="))]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides + ["hydra.run.dir=."], return_hydra_config=False)
    skip_failing_nvml_check()  # as train.py does: both sides' Adam updates without a needless check
    resolve_precision(cfg)  # trainer=gpu: its precision: auto, as train.py resolves it
    torch.manual_seed(cfg.seed)
    datamodule = ready(hydra.utils.instantiate(cfg.data))
    model = build_model(cfg, datamodule)
    if model.kind == "image":
        batches = [b for b, _ in zip(datamodule.train_dataloader(), range(steps))]  # decoded once, for both sides
        per_update, unit, plain_loop = float(len(batches[0])), "images", plain_gan_speed
        k = 1
    else:
        batches = []  # single batches, trimmed of their trailing padding as the loop trims them, for both sides
        while len(batches) < steps:
            batches.extend(b for batch in datamodule.train_dataloader() for b in batches_of(batch))
        # auto's choice, made once for every round; the batches a whole number of Lightning steps, so
        # that the framework makes the same updates as the plain loop
        # (at most a tenth of the updates, as the clock starts after a warm-up step and needs steps to
        # time, and a divisor of val_every, as training requires)
        k = min(max(1, steps // 10), resolve_updates_per_step(model, datamodule, cfg.val_every or steps))
        while (cfg.val_every or steps) % k:
            k -= 1
        batches = batches[: steps // k * k]
        per_update = sum(int((y >= 0).sum()) for _, y in batches) / len(batches)
        unit, plain_loop = "tokens", plain_speed
    print(f"benchmark: model={model_name} {' '.join(overrides)}; {len(batches)} updates, "
          f"{per_update:.1f} {unit} per update, {torch.get_num_threads()} threads, "
          f"{k} update(s) per Lightning step")

    # loop.compile=true where the framework compiles the whole update: its graph alone, too
    compiled_alone = model.kind == "text" and model.compile_mode() is not None and model.whole_update_compiles()
    results = {"plain": [], "framework": [], **({"compiled": []} if compiled_alone else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):  # alternate: the machine's noise and the order effect hit both
            sides = {
                "plain": lambda: plain_loop(copy.deepcopy(model), cfg, batches, datamodule),
                "framework": lambda: framework_speed(copy.deepcopy(cfg), copy.deepcopy(model), datamodule, batches,
                                                     Path(tmp) / str(round_), k),
            }
            if compiled_alone:
                sides["compiled"] = lambda: compiled_loop_speed(copy.deepcopy(model), cfg, batches, datamodule)
            for side in sorted(sides, reverse=round_ % 2 == 1):  # each side goes first in every other round
                torch.manual_seed(cfg.seed)  # the same random stream (dropout's masks) for every side
                results[side].append(sides[side]())
            print(f"round {round_ + 1}: " + ", ".join(f"{side} {results[side][-1][0]:.2f}" for side in results)
                  + " updates/s")
    (plain, plain_val), (framework, framework_val) = max(results["plain"]), max(results["framework"])
    figures = {"unit": unit, "per_update": per_update, "k": k, "plain": plain, "framework": framework,
               "plain_val": plain_val, "framework_val": framework_val}
    print(f"plain PyTorch loop: {plain:9.2f} updates/s  {plain * per_update:11.1f} {unit}/s")
    print(f"genlab (Lightning): {framework:9.2f} updates/s  {framework * per_update:11.1f} {unit}/s")
    if compiled_alone:
        alone = figures["compiled"] = max(results["compiled"])[0]
        print(f"compiled update in the plain loop (no framework): {alone:.2f} updates/s = {alone / plain:.3f} x plain; "
              f"genlab keeps {framework / alone:.0%} of it")
    if hasattr(model, "flops_per_token"):
        peak = figures["peak_flops"] = matmul_flops()
        for side, speed in (("plain", plain), ("framework", framework)):
            achieved = figures[f"{side}_flops"] = model.flops_per_token() * speed * per_update
            print(f"{'genlab' if side == 'framework' else side}: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of this machine's fp32 matmul "
                  f"({peak / 1e9:.1f} GFLOP/s)")
    if plain_val is not None and framework_val is not None:  # the same training, so the same loss within noise
        print(f"validation loss after the same updates: plain {plain_val:.4f}, genlab {framework_val:.4f}")
    ratios = figures["ratios"] = [f[0] / p[0] for f, p in zip(results["framework"], results["plain"])]
    print("rounds' ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    figures["ratio"] = statistics.median(ratios)
    print(f"ratio={figures['ratio']:.3f}")
    return figures


# make benchmark-table: the CPU rows of docs/performance.md, each a command of this script, shortened
# (fewer updates and rounds than the presets) so that all of them run in a few minutes on 2 cores
TABLE_ROWS = [
    "model=mlp steps=3000 rounds=3",
    # one update per Lightning step: Lightning's own cost per step (genlab.loop.steps.LIGHTNING_STEP_SECONDS)
    "model=mlp loop.updates_per_step=1 steps=1000 rounds=3",
    "model=mlp loop.compile=true steps=3000 rounds=2",
    "model=bigram steps=3000 rounds=3",
    "model=wavenet steps=1000 rounds=2",
    "model=wavenet loop.compile=true steps=1000 rounds=2",
    "model=lstm steps=300 rounds=2",
    "model=gru steps=300 rounds=2",
    "model=shakespeare_gpt steps=60 rounds=2",
    "model=gpt steps=30 rounds=2",
    "model=gpt steps=30 rounds=2 model.dropout=0.1",
    "model=dcgan steps=12 rounds=2",
]
TABLE_START, TABLE_END = "<!-- benchmark-table: start -->", "<!-- benchmark-table: end -->"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def speed_cell(figures: dict, side: str) -> str:
    """A side's best speed: updates/s (images/s for the DCGAN), and the GPT's share of the matmul speed."""
    speed = figures[side]
    if figures["unit"] == "images":
        return f"{speed * figures['per_update']:,.1f} images/s"
    cell = f"{speed:,.{0 if speed >= 100 else 2}f} updates/s"
    if side + "_flops" in figures:
        cell += f", {figures[side + '_flops'] / 1e9:.1f} GFLOP/s ({figures[side + '_flops'] / figures['peak_flops']:.0%})"
    return cell


def table_row(command: str, figures: dict, hardware: str, commit: str) -> str:
    genlab = speed_cell(figures, "framework")
    if "compiled" in figures:
        genlab += f"; compiled update alone {figures['compiled']:,.0f} updates/s"
    # best against best: a round that a stall of the machine hits moves the median of two rounds, not this
    ratios = figures["ratios"]
    ratio = f"{figures['framework'] / figures['plain']:.3f} ({min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)})"
    if "loop.updates_per_step=1" in command:  # what one Lightning step costs beyond its update
        ratio += f"; {1e3 * (1 / figures['framework'] - 1 / figures['plain']):.2f} ms per Lightning step"
    loss = ("" if figures["plain_val"] is None else
            f"{figures['plain_val']:.4f} / {figures['framework_val']:.4f}")
    return (f"| `python scripts/benchmark.py {command}` | {hardware} | {torch.__version__} | `{commit}` | "
            f"{speed_cell(figures, 'plain')} | {genlab} | {ratio} | {loss} |")


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"{torch.get_num_threads()} cores of {cpu}"


def commit() -> str:
    """The commit measured, ``+changes`` when the working tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf", "scripts"],
                           cwd=root, capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+changes" if dirty else "")


def write_table(argv: list[str]) -> None:
    """Every row of ``TABLE_ROWS`` at this commit (``argv``: overrides for every row), written into
    docs/performance.md between its markers."""
    page = PAGE.read_text(encoding="utf-8")
    if TABLE_START not in page or TABLE_END not in page:
        raise SystemExit(f"{PAGE}: no {TABLE_START} ... {TABLE_END} markers to write the table between")
    started, where, at = time.perf_counter(), hardware(), commit()
    rows = []
    for command in TABLE_ROWS:
        command = " ".join([command, *argv])
        print(f"\n== python scripts/benchmark.py {command}", flush=True)
        try:
            rows.append(table_row(command, measure(command.split()), where, at))
        except Exception as err:  # the row says so, and the others are still measured
            print(f"failed: {err!r}", flush=True)
            rows.append(f"| `python scripts/benchmark.py {command}` | {where} | {torch.__version__} | `{at}` | "
                        f"failed: {type(err).__name__}: {err} | | | |")
    minutes = (time.perf_counter() - started) / 60
    table = "\n".join([
        TABLE_START,
        f"`make benchmark-table` wrote these rows in {minutes:.1f} minutes.",
        "",
        "| command | hardware | torch | commit | plain PyTorch | genlab | ratio of the best (rounds' range, rounds) | val loss, plain / genlab |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        TABLE_END,
    ])
    before, rest = PAGE.read_text(encoding="utf-8").split(TABLE_START, 1)  # the page as it is now
    PAGE.write_text(before + table + rest.split(TABLE_END, 1)[1], encoding="utf-8")
    print(f"\nwrote {len(rows)} rows into {PAGE} ({minutes:.1f} minutes)")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="every CPU row of docs/performance.md, written into it "
                        "(the overrides then apply to every row)")
    parser.add_argument("overrides", nargs="*", help="model=<benchmark>, steps=N, rounds=N and train.py overrides")
    args = parser.parse_args(argv)
    if args.table:
        write_table(args.overrides)
    else:
        measure(args.overrides)


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
