"""Bengio et al. (2003) n-gram MLP, as in the notebook: embed the last ``block_size`` characters,
concatenate, one tanh hidden layer, logits. Applied at every position (left-padded with the start
token), so one (B, T) batch trains T windows per sequence at once."""

from __future__ import annotations

import torch
from torch import nn

from genlab.data.batches import context_windows
from genlab.models.base import LanguageModel


class MLP(LanguageModel):
    def __init__(self, block_size: int = 3, n_embd: int = 10, n_hidden: int = 200, **base):
        super().__init__(**base)
        self.block_size = block_size
        self.embedding = nn.Embedding(self.vocab_size, n_embd)
        self.hidden = nn.Linear(block_size * n_embd, n_hidden)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(n_hidden, self.vocab_size)
        with torch.no_grad():  # a less confident start: initial loss close to ln V
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    def tanh_layers(self):
        return {"hidden": self.tanh}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        windows = self.embedding(context_windows(idx, self.block_size))  # (B, T, block, n_embd)
        return self.head(self.tanh(self.hidden(windows.flatten(2))))
