"""Data at scale, measured: a large text as characters and as GPT-2 BPE tokens.

    python scripts/data_benchmark.py [--char-mb 1000] [--bpe-mb 200] [--mirror ../shared/data]

Makes the texts in a temporary folder (deleted afterwards) from the mirror's Shakespeare and
Divina lines in a seeded random order, then for each:

* tokenisation: the token file made in this process (MB of text per second, and per core);
  for BPE also tiktoken's own ``encode_ordinary_batch`` over the same text on the same cores;
* warm data load: the data module made again in this process from the cached token file (the
  source hashed to find its entry, the file mapped): what the corpus adds to a start;
* cold start: ``train.py`` (a tiny GPT, 2 updates, one validation) in a child process with an
  empty token cache, and warm start: the same again with the cache made; wall seconds and the
  child's peak memory (``ru_maxrss``), beside the same run on a 1 MB text (what the model,
  optimizer and libraries take).

Prints a Markdown table. Timings depend on the machine and its other work; memory does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from genlab.data import tokens as token_files
from genlab.data.text import TextDataModule
from genlab.data.tokenizer import load_gpt2_encoding
from genlab.data.module import ready

REPO = Path(__file__).resolve().parents[1]
CHILD = (
    "import resource, runpy, sys\n"
    "sys.argv = ['train.py', *sys.argv[1:]]\n"
    "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as stop:\n"
    "    assert not stop.code, stop.code\n"
    "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
)


def make_text(path: Path, megabytes: float, mirror: Path) -> None:
    lines = (mirror / "shakespeare" / "input.txt").read_text().splitlines()
    lines += (mirror / "divina" / "divina_commedia.raw.txt").read_text().splitlines()
    rng = random.Random(0)
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            block = "\n".join(rng.choices(lines, k=20_000)) + "\n"
            written += f.write(block)


def start(text: Path, tokenizer: str, data_dir: Path, run_dir: Path) -> tuple[float, int]:
    """(wall seconds, peak bytes) of train.py in a child: tiny GPT, 2 updates, one validation."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
         "data=divina", f"data.path={text}", f"data.tokenizer={tokenizer}", "data.seq_len=64", "data.batch_size=8",
         "data.val_tokens=8192", "trainer.max_steps=2", "val_every=2", "logger=none", "num_samples=0",
         "callbacks.insight=null", f"paths.data_dir={data_dir}", f"paths.output_dir={run_dir}",
         "trainer.enable_progress_bar=false"],
        cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train.py failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began, int(done.stdout.split("peak")[-1])


def tiktoken_speed(text: Path, mirror: Path, cores: int) -> float:
    """MB/s of tiktoken's own batch encoding of the text, in 1 MB pieces cut at newlines."""
    data = text.read_text(encoding="utf-8")
    pieces, at = [], 0
    while at < len(data):
        end = data.find("\n", at + (1 << 20))
        end = len(data) if end < 0 else end + 1
        pieces.append(data[at:end])
        at = end
    encoding = load_gpt2_encoding(str(mirror))
    began = time.perf_counter()
    encoding.encode_ordinary_batch(pieces, num_threads=cores)
    return text.stat().st_size / 1e6 / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--char-mb", type=float, default=1000, help="size of the character text (MB)")
    parser.add_argument("--bpe-mb", type=float, default=200, help="size of the GPT-2 BPE text (MB)")
    parser.add_argument("--mirror", default=os.environ.get("GENLAB_DATA_MIRROR") or str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    mirror = Path(args.mirror)
    cores = token_files.workers()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="genlab-data-benchmark-") as tmp:
        tmp = Path(tmp)
        small = tmp / "small.txt"
        make_text(small, 1, mirror)
        for tokenizer, megabytes in (("char", args.char_mb), ("gpt2", args.bpe_mb)):
            text = tmp / f"{tokenizer}.txt"
            make_text(text, megabytes, mirror)
            mb = text.stat().st_size / 1e6
            began = time.perf_counter()
            ready(TextDataModule(path=str(text), data_dir=tmp / f"made-{tokenizer}", tokenizer=tokenizer, mirror=str(mirror)))
            speed = mb / (time.perf_counter() - began)
            began = time.perf_counter()
            ready(TextDataModule(path=str(text), data_dir=tmp / f"made-{tokenizer}", tokenizer=tokenizer, mirror=str(mirror)))
            warm_load = time.perf_counter() - began
            baseline = start(small, tokenizer, tmp / f"small-{tokenizer}", tmp / f"run-small-{tokenizer}")
            cold = start(text, tokenizer, tmp / f"data-{tokenizer}", tmp / f"run-cold-{tokenizer}")
            warm = start(text, tokenizer, tmp / f"data-{tokenizer}", tmp / f"run-warm-{tokenizer}")
            reference = tiktoken_speed(text, mirror, cores) if tokenizer == "gpt2" else None
            rows.append((tokenizer, mb, speed, reference, warm_load, baseline, cold, warm))
            for folder in tmp.glob(f"*-{tokenizer}"):  # the token files: room for the next text
                shutil.rmtree(folder)
            text.unlink()
    print(f"\n{cores} cores, torch {torch.__version__}")
    print("| text | tokenisation MB/s (per core) | tiktoken batch MB/s | warm data load s | cold start s | "
          "warm start s | 1 MB text start s | peak memory cold / warm / 1 MB text | above the 1 MB run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokenizer, mb, speed, reference, warm_load, baseline, cold, warm in rows:
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        ref = f"{reference:.1f} ({speed / reference:.2f}x of it)" if reference else "-"
        print(f"| {mb:,.0f} MB, {tokenizer} | {speed:.1f} ({speed / cores:.1f}) | {ref} | {warm_load:.2f} "
              f"| {cold[0]:.1f} | {warm[0]:.1f} "
              f"| {baseline[0]:.1f} | {gb(cold[1])} / {gb(warm[1])} / {gb(baseline[1])} "
              f"| {(cold[1] - baseline[1]) / 2**20:+.0f} / {(warm[1] - baseline[1]) / 2**20:+.0f} MiB |")


if __name__ == "__main__":
    main()
