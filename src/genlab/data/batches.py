"""In-memory batching: whole splits live as tensors and batches are cut by indexing.

A per-sample ``Dataset`` with the default collate costs more than a tiny model's step, so these
iterables hand Lightning ready-made batches. With ``batches_per_step = K > 1`` every item is a list
of K batches, which the language-model base consumes as K optimizer updates in one Lightning step
(see ``genlab.models.base``).
"""

from __future__ import annotations

import torch


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns in which every target is padding (-1)."""
    real = (y >= 0).any(0).nonzero()
    width = int(real[-1]) + 1 if len(real) else 1
    return x[:, :width], y[:, :width]


class SequenceBatches:
    """Shuffled batches of whole sequences (names), one pass over the split per epoch.

    The order depends only on ``seed`` and the epoch number, so a resumed run sees the batches the
    uninterrupted run would have seen."""

    def __init__(self, x, y, batch_size, batches_per_step=1, seed=0, shuffle=True, drop_last=True):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.batches_per_step = batches_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._num_batches() // self.batches_per_step

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        self.epoch += 1
        batches = (
            trim(self.x[idx], self.y[idx])
            for idx in order[: self._num_batches() * self.batch_size].split(self.batch_size)
        )
        yield from group(batches, self.batches_per_step, len(self))


class WindowBatches:
    """Random windows of ``seq_len + 1`` tokens from one long token stream (training on text).

    An "epoch" is ``steps_per_epoch`` items; the windows depend only on ``seed`` and the epoch."""

    def __init__(self, tokens, seq_len, batch_size, steps_per_epoch, batches_per_step=1, seed=0):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.batches_per_step = batches_per_step
        self.seed = seed
        self.epoch = 0
        self.offsets = torch.arange(seq_len + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        high = len(self.tokens) - self.seq_len - 1
        tokens = torch.as_tensor(self.tokens)

        def batches():
            while True:
                starts = torch.randint(0, high + 1, (self.batch_size, 1), generator=g)
                window = tokens[starts + self.offsets].long()
                yield window[:, :-1], window[:, 1:]

        yield from group(batches(), self.batches_per_step, len(self))


def group(batches, k: int, count: int):
    """Yield ``count`` items: single batches when k == 1, else lists of k batches."""
    batches = iter(batches)
    for _ in range(count):
        if k == 1:
            yield next(batches)
        else:
            yield [next(batches) for _ in range(k)]


class FixedBatches:
    """Deterministic evaluation batches, in order (validation and test)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            yield trim(self.x[start : start + self.batch_size], self.y[start : start + self.batch_size])
