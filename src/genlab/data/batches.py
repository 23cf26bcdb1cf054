"""Batching by indexing: names live as tensors, text as a memory-mapped token file, and batches
are cut from them by indexing.

A per-sample ``Dataset`` with the default collate costs more than a tiny model's step, so these
iterables hand Lightning ready-made ``(x, y)`` batches: for training one per optimizer update, at
the data's full width (the loop groups them for its Lightning steps and trims each batch's
trailing padding, targets -1, ``genlab.loop.steps``), for evaluation each trimmed to its longest sequence.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
import torch.nn.functional as F

from genlab.errors import DataError


def context_windows(idx: torch.Tensor, size: int, pad_id: int = 0) -> torch.Tensor:
    """(B, T) -> (B, T, size): at position t the tokens t-size+1 .. t, left-padded with ``pad_id``
    (the start token), so position t of a name sees the notebook's window ('...' -> 'e')."""
    padded = F.pad(idx, (size - 1, 0), value=pad_id)
    return padded.unfold(1, size, 1)


def widths(y: torch.Tensor) -> torch.Tensor:
    """(..., B, T) targets -> (...,): one past the last column holding a real target (not -1)."""
    real = (y >= 0).any(-2)
    return real.shape[-1] - real.flip(-1).int().argmax(-1)


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns in which every target is padding (-1)."""
    width = int(widths(y))
    return x[:, :width], y[:, :width]


def replica(datamodule) -> tuple[int, int]:
    """(this process's rank, number of processes) under distributed training; (0, 1) otherwise."""
    trainer = datamodule.trainer if datamodule is not None else None
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


class BatchStream:
    """A stream of training batches, one per update: batch p depends only on p (and a seed), never
    on what came before.

    Where its first pass starts, the stream asks the trainer of ``loop`` (the data module) for:
    the updates made so far, so a resumed run sees the batches the uninterrupted run would have seen
    (Lightning's own loader state would be off by the item it prefetches); each further pass goes on
    where the previous one ended. Without a trainer (a stream looked at on its own) it starts at 0.

    Under distributed training, update p of rank r takes global batch ``p * world + r``: the
    ranks see different batches, and together the batches one process would see in turn."""

    def __init__(self, loop=None):
        self.loop = loop
        self.rank, self.world = replica(loop)
        self.next_position: int | None = None  # where the next pass starts, once a pass has ended

    @property
    def trainer(self):
        return self.loop.trainer if self.loop is not None else None

    def start(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    @property
    def one_batch(self) -> bool:
        """``debug=overfit`` (Lightning's ``trainer.overfit_batches``): every update takes the first batch."""
        return self.trainer is not None and self.trainer.overfit_batches > 0

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def global_index(self, position: int) -> int:
        return position * self.world + self.rank

    def __iter__(self):
        start = self.start() if self.next_position is None else self.next_position
        one_batch = self.one_batch
        for position in range(start, start + len(self)):
            yield self.batch(self.global_index(0 if one_batch else position))
        self.next_position = start + len(self)


class SequenceBatches(BatchStream):
    """Shuffled batches of whole sequences (names): one pass over the split per data epoch, a new
    order each epoch; a Lightning epoch is about one pass."""

    def __init__(self, x, y, batch_size, seed=0, loop=None):
        super().__init__(loop)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(x) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split has {len(x)} sequences, fewer than one batch of {batch_size}; "
                            "lower data.batch_size")
        self._order = (None, None)  # (data epoch, its permutation)

    def __len__(self) -> int:
        return -(-self.batches_per_epoch // self.world)

    def batch(self, position: int):
        epoch, i = divmod(position, self.batches_per_epoch)
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.x), generator=g))
        idx = self._order[1][i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


# A page fault on a file mapping maps a stretch of the file around the page (fault-around, large
# folios), so random windows would map a large token file whole over a run: a copy of it counted
# in the process's memory. A token file up to this size may be mapped whole (the fastest reads);
# a larger one lets go of its pages after every read (each window then costs a page fault).
MAPPED_BYTES = 256 << 20


def release_pages(tokens: np.ndarray) -> None:
    """Unmap the pages that reading windows mapped, for a token file over ``MAPPED_BYTES``
    (``madvise(MADV_DONTNEED)``: a read-only mapping reads them back from the page cache when
    touched again; the windows were copied out already). As nanoGPT opening its memmap anew for
    every batch, without the cost of a new mapping."""
    mapping = tokens.base  # a numpy memmap's base is its mmap; a view's, the array it views
    while isinstance(mapping, np.ndarray):
        mapping = mapping.base
    if isinstance(mapping, mmap.mmap) and len(mapping) > MAPPED_BYTES and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


def read_windows(tokens: np.ndarray, starts: np.ndarray, length: int, end: int | None = None) -> torch.Tensor:
    """Windows ``tokens[s : s + length]`` for each start, as int64 (B, length), read by indexing:
    from a memory map only these pages are touched, never a copy of the split. Positions from
    ``end`` on read as -1."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)
    if end is None:
        window = torch.from_numpy(tokens[index].astype(np.int64))
    else:
        window = torch.from_numpy(tokens[np.minimum(index, end - 1)].astype(np.int64))
        window[torch.from_numpy(index >= end)] = -1
    release_pages(tokens)
    return window


class WindowBatches(BatchStream):
    """Random windows of ``seq_len + 1`` tokens from one long token stream (training on text); a
    Lightning epoch is about one pass over the text (at least one item). ``tokens`` may be a memory map."""

    def __init__(self, tokens, seq_len, batch_size, seed=0, loop=None):
        super().__init__(loop)
        self.tokens = np.asanyarray(tokens)  # a memory map stays one
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.tokens) // (self.world * batch_size * seq_len)
        if len(self.tokens) <= seq_len + 1:
            raise DataError(f"the training text has {len(self.tokens)} tokens, too few for windows of {seq_len + 1}")

    def __len__(self) -> int:
        return max(1, self.batches_per_epoch)

    def batch(self, position: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=g)
        window = read_windows(self.tokens, starts.numpy(), self.seq_len + 1)
        return window[:, :-1], window[:, 1:]


class StreamBatches(BatchStream):
    """The training text read in order by ``batch_size`` parallel streams (for recurrent models
    that carry their state): row b of consecutive batches continues the same stretch of text, so
    the state after one chunk is the right start for the next. Wraps around at the end. Under
    distributed training each rank reads its own ``batch_size`` of the ``world * batch_size`` streams.
    ``tokens`` may be a memory map: each batch reads its windows from it."""

    def __init__(self, tokens, seq_len, batch_size, loop=None):
        super().__init__(loop)
        self.tokens = np.asanyarray(tokens)  # a memory map stays one
        self.seq_len = seq_len
        rank, world = self.rank, self.world
        self.chunks = (len(tokens) - 1) // (world * batch_size * seq_len)  # chunks per stream
        if self.chunks == 0:
            raise DataError(f"the training text has {len(tokens)} tokens, too few for {batch_size} streams "
                            f"of {seq_len}; lower data.batch_size or data.seq_len")
        self.starts = (np.arange(batch_size) + rank * batch_size) * self.chunks * seq_len

    def __len__(self) -> int:
        return self.chunks

    def global_index(self, position: int) -> int:
        return position  # the streams are this rank's own already

    def batch(self, position: int):
        window = read_windows(self.tokens, self.starts + (position % self.chunks) * self.seq_len, self.seq_len + 1)
        return window[:, :-1], window[:, 1:]


class FixedBatches:
    """Deterministic evaluation batches, in order (validation and test). Under distributed
    training rank r evaluates batches r, r + world, ...: every example exactly once over all
    ranks, so the summed losses (see ``LanguageModel._eval_end``) give the exact mean. Every rank
    runs the same number of batches (a rank short of one gets a batch without targets), since
    each forward of a DistributedDataParallel model is a collective call."""

    def __init__(self, x, y, batch_size, replica=(0, 1)):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rank, self.world = replica

    def count(self) -> int:
        return len(self.x)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.y[start:stop]

    def __len__(self) -> int:
        return -(-self.count() // (self.world * self.batch_size))

    def __iter__(self):
        for i in range(len(self)):
            start = (i * self.world + self.rank) * self.batch_size
            if start >= self.count():  # nothing left for this rank: targets -1 count for nothing
                x, y = self.rows(0, 1)
                yield x, torch.full_like(y, -1)
                continue
            yield trim(*self.rows(start, start + self.batch_size))


class FixedWindows(FixedBatches):
    """Evaluation windows read from a (memory-mapped) token stream: window i takes inputs
    ``tokens[s : s + seq_len]`` and targets one further, for s = ``starts[i]``; targets at or
    past ``end`` (the split's end) are padding."""

    def __init__(self, tokens, starts, seq_len, end, batch_size, replica=(0, 1)):
        self.tokens, self.starts, self.seq_len, self.end = tokens, np.asarray(starts), seq_len, end
        self.batch_size = batch_size
        self.rank, self.world = replica

    def count(self) -> int:
        return len(self.starts)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = read_windows(self.tokens, self.starts[start:stop], self.seq_len + 1, self.end)
        x = window[:, :-1].clamp(min=0)  # an input past the end is padding too (its target is -1)
        return x, window[:, 1:]
