"""Seconds nanoGPT spent in updates, evaluation apart, from its console output; to compare with
genlab's ``update_seconds`` (metrics.json) at the same recipe (``experiment=shakespeare_gpt_cpu``).

nanoGPT prints ``iter N: loss L, time T ms`` after each update when ``--log_interval=1``; T is the
time since the previous update ended, so an update that follows an evaluation (``step N: ...``) also
holds that evaluation and its checkpoint. Those updates are counted at the median update time.

    python data/shakespeare_char/prepare.py   # in nanoGPT's folder: tinyshakespeare at the character level
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \\
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 > nanogpt.log   # in nanoGPT's folder
    python scripts/nanogpt_update_seconds.py nanogpt.log
"""

from __future__ import annotations

import argparse
import re
import statistics

ITERATION = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVALUATION = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def update_seconds(lines) -> dict:
    clean, after_evaluation, val_losses = [], 0, []
    evaluated = False
    for line in lines:
        if match := EVALUATION.match(line):
            evaluated = True
            val_losses.append(float(match[3]))
        elif match := ITERATION.match(line):
            if evaluated:
                after_evaluation += 1
            else:
                clean.append(float(match[3]) / 1000)
            evaluated = False
    if not clean:
        raise SystemExit("no 'iter N: ... time T ms' lines: run nanoGPT with --log_interval=1")
    median = statistics.median(clean)
    return {"updates": len(clean) + after_evaluation, "update_seconds": sum(clean) + after_evaluation * median,
            "median_ms": 1000 * median, "val_loss": val_losses[-1] if val_losses else None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="nanoGPT's console output (--log_interval=1)")
    with open(parser.parse_args().log) as log:
        result = update_seconds(log)
    print(f"{result['updates']:,} updates in {result['update_seconds']:.1f} s (median {result['median_ms']:.1f} ms),"
          f" final val loss {result['val_loss']}")
