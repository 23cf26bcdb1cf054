"""The notebook's bigram model (and n-gram tables with ``block_size > 1``).

``counting=True``: the table of counts, filled in one pass over the training split; with add-k
smoothing its logits are log((counts + k) / row sum), so the loss is the table's negative
log-likelihood per character. ``counting=False``: the gradient-trained twin, one linear layer on the
one-hot context (an embedding of V**block_size rows). The table has V**block_size rows: 28 for a bigram,
784 for a trigram, 21,952 for a 4-gram, mostly empty, which is why counting does not scale.
"""

from __future__ import annotations

import torch
from torch import nn

from genlab.data.batches import context_windows
from genlab.models.base import LanguageModel


class Bigram(LanguageModel):
    def __init__(self, block_size: int = 1, counting: bool = True, smoothing: float = 1.0, **base):
        super().__init__(**base)
        self.block_size = block_size
        rows = self.vocab_size**block_size
        if counting:
            self.register_buffer("counts", torch.zeros(rows, self.vocab_size))
            self.hparams.optimizer = None  # nothing to optimise: the table is counted
            self.single_pass = True  # one epoch over the training split, whatever max_steps says
        else:
            self.logit_table = nn.Embedding(rows, self.vocab_size)
            nn.init.zeros_(self.logit_table.weight)  # uniform at start, loss = ln V
        self.register_buffer("place", self.vocab_size ** torch.arange(block_size - 1, -1, -1))

    def count_table(self) -> torch.Tensor | None:
        # the bigram's table is square and drawn; an n-gram's has V^n rows
        return self.counts if self.hparams.counting and self.block_size == 1 else None

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T): the table row of each position's context (base-V number)."""
        return (context_windows(idx, self.block_size) * self.place).sum(-1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.hparams.counting:
            smoothed = self.counts + self.hparams.smoothing
            return (smoothed / smoothed.sum(1, keepdim=True)).log()[self.rows(idx)]
        return self.logit_table(self.rows(idx))

    def training_update(self, x, y):
        if not self.hparams.counting:
            return super().training_update(x, y)
        real = y >= 0  # an update of the counting model: one batch counted into the table
        self.counts.index_put_((self.rows(x)[real], y[real]), torch.ones(()), accumulate=True)
        return None
