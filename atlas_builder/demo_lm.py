"""The demo's language model: a small byte-level transformer in plain torch (`ByteTransformer`).

Tokens are UTF-8 bytes (text.ByteTokenizer: 256 of them); each block is pre-norm causal self-attention and an
MLP whose hidden activation is its own module (`blocks.N.mlp.act`, the layer the atlas probes by default: one
unit per MLP neuron); the output is [B, T, 256] next-byte logits through `unembed`. `context` is the longest
window it reads (its position embedding's size).

This module owns the architecture only; it reads no data and writes no files.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()  # its output: the MLP's neurons
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """[B, T] byte ids -> [B, T, 256] logits of the next byte."""

    def __init__(self, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4, hidden: int = 256):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([Block(width, heads, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))
