"""Character-level recurrent language models: embedding -> ``n_layers`` of RNN (tanh), LSTM or
GRU -> linear head.

On text read in order (``data.sampling=sequential``) they train with truncated back-propagation
through time: the hidden state carries, detached, from one chunk to the next, as the notebook's
RNN does on the Divina Commedia with 25-character chunks. Generation carries the state forward
one token at a time instead of re-reading the context."""

from __future__ import annotations

import torch
from torch import nn

from genlab.models.base import LanguageModel

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class Recurrent(LanguageModel):
    def __init__(self, cell: str = "lstm", n_embd: int = 32, n_hidden: int = 256, n_layers: int = 1,
                 dropout: float = 0.0, **base):
        super().__init__(**base)
        if cell not in CELLS:
            raise ValueError(f"model.cell={cell} is not known; use one of {', '.join(CELLS)}")
        self.embedding = nn.Embedding(self.vocab_size, n_embd)
        self.rnn = CELLS[cell](n_embd, n_hidden, num_layers=n_layers, batch_first=True,
                               dropout=dropout if n_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(n_hidden, self.vocab_size)
        self.carried = None  # the state handed from one training chunk to the next

    def tanh_layers(self):
        # a vanilla RNN's outputs are its last layer's tanh activations (LSTM's and GRU's are not)
        return {f"rnn.layer{self.hparams.n_layers}": self.rnn} if self.hparams.cell == "rnn" else {}

    def run(self, idx: torch.Tensor, state=None):
        """(B, T) ids and a state -> (B, T, V) logits and the state after the last token."""
        out, state = self.rnn(self.drop(self.embedding(idx)), state)
        return self.head(self.drop(out)), state

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.run(idx)[0]

    def training_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.sequential:
            return self(x)
        logits, state = self.run(x, self.carried)
        self.carried = detach(state)  # truncated BPTT: keep the state, not its graph
        return logits

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["carried_state"] = self.carried  # so that a resumed run continues exactly

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self.carried = checkpoint.get("carried_state")

    def next_token_logits(self, idx: torch.Tensor, state=None):
        # the first call reads the whole prompt; later ones feed only the newest token
        logits, state = self.run(idx if state is None else idx[:, -1:], state)
        return logits[:, -1], state
