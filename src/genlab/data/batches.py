"""In-memory batching: whole splits live as tensors and batches are cut by indexing.

A per-sample ``Dataset`` with the default collate costs more than a tiny model's step, so these
iterables hand Lightning ready-made batches. Training items are groups of K = ``batches_per_step``
batches, packed as three tensors ``(xs, ys, widths)``: xs and ys of shape (K, B, T), and the width
of each batch (its longest sequence), so the model trims each batch without extra padding. The
language-model base makes K optimizer updates from one item (see ``genlab.models.base``); three
tensors cost Lightning far less to hand over than a list of K pairs.
"""

from __future__ import annotations

import torch


def widths(y: torch.Tensor) -> torch.Tensor:
    """(..., B, T) targets -> (...,): one past the last column holding a real target (not -1)."""
    real = (y >= 0).any(-2)
    return real.shape[-1] - real.flip(-1).int().argmax(-1)


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns in which every target is padding (-1)."""
    width = int(widths(y))
    return x[:, :width], y[:, :width]


def group(xs: torch.Tensor, ys: torch.Tensor, k: int):
    """(N*k*B... ) rows of K batches -> one training item (xs, ys, widths), trimmed to the widest."""
    w = widths(ys)
    width = int(w.max())
    return xs[..., :width], ys[..., :width], w


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
        per_item = self.batch_size * self.batches_per_step
        for idx in order[: len(self) * per_item].split(per_item):
            idx = idx.view(self.batches_per_step, self.batch_size)
            yield group(self.x[idx], self.y[idx], self.batches_per_step)


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

        for _ in range(len(self)):
            starts = torch.randint(0, high + 1, (self.batches_per_step, self.batch_size, 1), generator=g)
            window = tokens[starts + self.offsets].long()
            yield group(window[..., :-1], window[..., 1:], self.batches_per_step)


class FixedBatches:
    """Deterministic evaluation batches, in order (validation and test)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            yield trim(self.x[start : start + self.batch_size], self.y[start : start + self.batch_size])
