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

from genlab.errors import DataError


def widths(y: torch.Tensor) -> torch.Tensor:
    """(..., B, T) targets -> (...,): one past the last column holding a real target (not -1)."""
    real = (y >= 0).any(-2)
    return real.shape[-1] - real.flip(-1).int().argmax(-1)


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns in which every target is padding (-1)."""
    width = int(widths(y))
    return x[:, :width], y[:, :width]


def group(xs: torch.Tensor, ys: torch.Tensor):
    """K batches (K, B, T) -> one training item (xs, ys, widths), trimmed to the widest batch."""
    w = widths(ys)
    width = int(w.max())
    return xs[..., :width], ys[..., :width], w


class SequenceBatches:
    """Shuffled batches of whole sequences (names): one pass over the split per data epoch, a new
    order each epoch.

    The batches form one stream across epochs and each item takes the next K of it, so every
    item holds exactly K batches and ``trainer.global_step`` = K x Lightning steps. Which batch
    comes at stream position p depends only on ``seed`` and p, and ``position`` is the whole
    state (``state_dict``), so a resumed run sees the batches the uninterrupted one would have."""

    def __init__(self, x, y, batch_size, batches_per_step=1, seed=0):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.batches_per_step = batches_per_step
        self.seed = seed
        self.batches_per_epoch = len(x) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split has {len(x)} sequences, fewer than one batch of {batch_size}; lower data.batch_size")
        self.position = 0
        self._order = (None, None)  # (data epoch, its permutation)

    def __len__(self) -> int:
        """Items per Lightning epoch: about one pass over the data."""
        return -(-self.batches_per_epoch // self.batches_per_step)

    def batch_indices(self, position: int) -> torch.Tensor:
        epoch, i = divmod(position, self.batches_per_epoch)
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.x), generator=g))
        return self._order[1][i * self.batch_size : (i + 1) * self.batch_size]

    def __iter__(self):
        for _ in range(len(self)):
            k = self.batches_per_step
            idx = torch.stack([self.batch_indices(p) for p in range(self.position, self.position + k)])
            self.position += k
            yield group(self.x[idx], self.y[idx])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class WindowBatches:
    """Random windows of ``seq_len + 1`` tokens from one long token stream (training on text).

    The windows of stream position p depend only on ``seed`` and p (see ``SequenceBatches``);
    a Lightning epoch is ``steps_per_epoch`` items."""

    def __init__(self, tokens, seq_len, batch_size, steps_per_epoch, batches_per_step=1, seed=0):
        self.tokens = torch.as_tensor(tokens)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.batches_per_step = batches_per_step
        self.seed = seed
        self.position = 0
        self.offsets = torch.arange(seq_len + 1)
        if len(self.tokens) <= seq_len + 1:
            raise DataError(f"the training text has {len(self.tokens)} tokens, too few for windows of {seq_len + 1}")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, position: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size, 1), generator=g)
        return self.tokens[starts + self.offsets]

    def __iter__(self):
        for _ in range(len(self)):
            k = self.batches_per_step
            windows = torch.stack([self.batch(p) for p in range(self.position, self.position + k)]).long()
            self.position += k
            yield group(windows[..., :-1], windows[..., 1:])

    state_dict = SequenceBatches.state_dict
    load_state_dict = SequenceBatches.load_state_dict


class StreamBatches:
    """The training text read in order by ``batch_size`` parallel streams (for recurrent models
    that carry their state): row b of consecutive items continues the same stretch of text, so
    the state after one chunk is the right start for the next. Wraps around at the end."""

    def __init__(self, tokens, seq_len, batch_size, batches_per_step=1):
        self.seq_len, self.batches_per_step = seq_len, batches_per_step
        self.chunks = (len(tokens) - 1) // (batch_size * seq_len)  # chunks per stream
        if self.chunks == 0:
            raise DataError(f"the training text has {len(tokens)} tokens, too few for {batch_size} streams "
                            f"of {seq_len}; lower data.batch_size or data.block_size")
        length = self.chunks * seq_len
        starts = torch.arange(batch_size) * length
        self.streams = torch.stack([torch.as_tensor(tokens[s : s + length + 1]) for s in starts.tolist()]).long()
        self.position = 0

    def __len__(self) -> int:
        return -(-self.chunks // self.batches_per_step)

    def batch(self, position: int) -> torch.Tensor:
        start = (position % self.chunks) * self.seq_len
        return self.streams[:, start : start + self.seq_len + 1]

    def __iter__(self):
        for _ in range(len(self)):
            k = self.batches_per_step
            windows = torch.stack([self.batch(p) for p in range(self.position, self.position + k)])
            self.position += k
            yield group(windows[..., :-1], windows[..., 1:])

    state_dict = SequenceBatches.state_dict
    load_state_dict = SequenceBatches.load_state_dict


class FixedBatches:
    """Deterministic evaluation batches, in order (validation and test)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            yield trim(self.x[start : start + self.batch_size], self.y[start : start + self.batch_size])
