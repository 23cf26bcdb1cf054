"""A decoder-only transformer (GPT): token + learned position embeddings, pre-LayerNorm blocks of
causal multi-head self-attention (one fused QKV projection, PyTorch's scaled_dot_product_attention)
and a 4x MLP, a final LayerNorm and a linear head, optionally tied to the token embedding."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from genlab.errors import ConfigError
from genlab.models.base import LanguageModel


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, attention_dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        # dropout on the attention weights: on a CPU it turns PyTorch's fused attention kernel off
        self.attention_dropout = attention_dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, attention_dropout: float, bias: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, attention_dropout, bias)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(LanguageModel):
    reads_whole_context = True

    def __init__(
        self,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.1,
        bias: bool = True,
        tie_weights: bool = False,
        block_size: int | None = None,
        attention_dropout: float | None = None,
        **base,
    ):
        super().__init__(**base)
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}; "
                              "each head gets n_embd / n_head dimensions")
        context = block_size or self.seq_len  # default: the data's sequence length
        if self.seq_len > context:
            raise ConfigError(f"the data's sequences have {self.seq_len} tokens, longer than the model's "
                              f"context model.block_size={context}; raise it or lower data.seq_len")
        self.block_size = context
        self.token_embedding = nn.Embedding(self.vocab_size, n_embd)
        self.position_embedding = nn.Embedding(context, n_embd)
        self.drop = nn.Dropout(dropout)
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, attention_dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, self.vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 n_layer)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def token_embeddings(self):
        return self.token_embedding

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ConfigError(f"a sequence of {T} tokens is longer than the model's context ({self.block_size})")
        positions = torch.arange(T, device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def parameter_groups(self):
        """Weight decay on matrices only, not on biases, LayerNorm gains or position tables."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if p.dim() >= 2 and "position" not in n]
        no_decay = [p for n, p in params.items() if p.dim() < 2 or "position" in n]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention's
        12 x n_layer x n_embd x T (the estimate of the PaLM paper, appendix B)."""
        n_params = sum(p.numel() for p in self.parameters()) - self.position_embedding.weight.numel()
        h = self.hparams
        return 6 * n_params + 12 * h.n_layer * h.n_embd * self.block_size
