"""The notebook's hierarchical MLP ("WaveNet", makemore part 5): embed, then fuse consecutive pairs
level by level (Linear without bias -> BatchNorm -> tanh) until one vector covers the whole context
of 2**n_levels characters, then a final Linear.

Fusing pairs of pairs is a causal convolution with kernel 2 and dilations 1, 2, 4, ...: level l
combines the vectors at t - 2**l and t. Applied to the input left-padded with 2**n_levels - 1 start
tokens, without further padding, it predicts at every position at once, and position t sees
exactly the notebook's window of the last 2**n_levels characters.

BatchNorm takes its statistics over batch and time, from the positions whose outputs lead to a
real target (padding after a name's end is left out; on the notebook's windows of 8 characters
with one target, exactly the notebook's 4, 2 and 1 positions per window and level) and, for whole
sequences, from the other sequences of the batch, so that no position sees its own future through
them (``SequenceBatchNorm``); sampling and evaluation use the running statistics."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from genlab.errors import ConfigError
from genlab.models.base import LanguageModel


class SequenceBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (B, L, C), with statistics over the positions in ``mask`` only (those whose
    output feeds a real target).

    Whole sequences: statistics over batch and time would let position t see its own sequence's
    future (the mean includes later positions), and the network learns to cheat: training loss
    falls far below the validation loss. So each sequence is normalised with the statistics of
    the *other* sequences of the batch (``leave_one_out``). Through several levels a sequence still
    reaches its own statistics by way of the others' activations, so no gradient flows through
    the statistics: nothing rewards the network for using that path.

    Windows (one target per row, the notebook's batches): a row's statistics may include itself,
    as in the notebook, since nothing in a window is in its target's future.

    The running statistics, used for evaluation and sampling, take the whole batch."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None,
                leave_one_out: torch.Tensor | None = None) -> torch.Tensor:
        """``leave_one_out`` (B,) bool: the rows normalised with the other rows' statistics (whole
        sequences); the others, and all rows when it is None, take the whole batch's (windows).
        Chosen per row by ``torch.where``, not by branching on the data, so that the compiled whole
        update (``loop.compile``) is one graph."""
        if not self.training or (leave_one_out is not None and h.shape[0] < 2):  # one sequence has no others
            return F.batch_norm(h.transpose(1, 2), self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps).transpose(1, 2)
        with torch.no_grad():
            weight = mask if mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            weight = weight.unsqueeze(-1).to(h.dtype)
            count = weight.sum(1)  # (B, 1) positions per sequence
            sums, squares = (h * weight).sum(1), (h * h * weight).sum(1)  # (B, C)
            total_count, total_sums, total_squares = count.sum(0), sums.sum(0), squares.sum(0)
            batch_mean = total_sums / total_count
            batch_var = (total_squares / total_count - batch_mean**2).clamp(min=0)
            others = (total_count - count).clamp(min=1)
            mean = (total_sums - sums) / others
            var = ((total_squares - squares) / others - mean * mean).clamp(min=0)
            rows = leave_one_out.unsqueeze(1) if leave_one_out is not None else torch.zeros_like(count, dtype=torch.bool)
            mean, var = torch.where(rows, mean, batch_mean), torch.where(rows, var, batch_var)
            self.running_mean.lerp_(batch_mean, self.momentum)
            self.running_var.lerp_(batch_var * total_count / (total_count - 1).clamp(min=1), self.momentum)
        return (h - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps) * self.weight + self.bias


class WaveNet(LanguageModel):
    def __init__(self, block_size: int = 8, n_embd: int = 10, n_hidden: int = 68, **base):
        super().__init__(**base)
        if block_size < 2 or block_size & (block_size - 1):
            raise ConfigError(f"model.block_size={block_size}: the WaveNet's context must be a power of two "
                              "(2, 4, 8, 16, ...), since each level fuses pairs")
        self.block_size = block_size
        self.dilations = [2**level for level in range(block_size.bit_length() - 1)]
        self.embedding = nn.Embedding(self.vocab_size, n_embd)
        widths = [n_embd] + [n_hidden] * len(self.dilations)
        self.fuse = nn.ModuleList(nn.Linear(2 * w, n_hidden, bias=False) for w in widths[:-1])
        self.norms = nn.ModuleList(SequenceBatchNorm(n_hidden) for _ in self.dilations)
        self.tanhs = nn.ModuleList(nn.Tanh() for _ in self.dilations)
        self.head = nn.Linear(n_hidden, self.vocab_size)
        with torch.no_grad():
            self.head.weight.mul_(0.1)  # as the notebook: a less confident start

    def tanh_layers(self):
        return {f"level{i + 1}": tanh for i, tanh in enumerate(self.tanhs)}

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, T), in training: the positions with a real target; BatchNorm then takes its
        statistics over the positions of each level that feed them."""
        pad = self.block_size - 1
        h = self.embedding(F.pad(idx, (pad, 0), value=0))  # (B, T + pad, n_embd)
        masks = self.needed_positions(valid) if valid is not None else [None] * len(self.dilations)
        # one target per row: the notebook's windows, else whole sequences (see SequenceBatchNorm)
        leave_one_out = valid.sum(1) > 1 if valid is not None else None
        for d, fuse, norm, tanh, mask in zip(self.dilations, self.fuse, self.norms, self.tanhs, masks):
            h = fuse(torch.cat([h[:, :-d], h[:, d:]], dim=-1))  # the pair (t - d, t)
            h = tanh(norm(h, mask, leave_one_out))
        return self.head(h)

    def needed_positions(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """For each level, the output positions that some real target depends on. Walking down
        from the top: output j of a level with dilation d reads its input at j and j + d."""
        masks, needed = [], valid
        for d in reversed(self.dilations):
            masks.append(needed)
            below = torch.zeros(needed.shape[0], needed.shape[1] + d, dtype=torch.bool, device=needed.device)
            below[:, :-d] |= needed
            below[:, d:] |= needed
            needed = below
        return masks[::-1]

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, dict]:
        return (x,), {"valid": y >= 0}
