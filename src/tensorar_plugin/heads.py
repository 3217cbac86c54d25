"""TensorAR's input encoder and output decoder: small query transformers around the base model.

Both are residual branches whose last projection starts at zero, so a freshly wrapped model computes
exactly what the base model computes; fine-tuning then grows them from there.

* `TensorEncoder`: the `k` embeddings of an input window (plus slot embeddings) and one learned
  query go through `depth` bidirectional blocks (timm ViT layout); the query's output, projected back to the model
  width, is added to the base embedding of the window's first token.
* `TensorDecoder`: one backbone hidden state is copied into `k` slot tokens (plus slot embeddings),
  mixed by `depth` blocks, and projected to `k - 1` residual updates of that hidden state (slots
  1..k-1). Slot 0 gets no update: its logits are always the base model's own.

Both work at an inner width `hidden_dim` (default half the model width) to keep the overhead near
the paper's +4.6% of LlamaGen-B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

__all__ = ["TensorEncoder", "TensorDecoder", "default_num_heads"]


def default_num_heads(hidden_dim: int) -> int:
    """64-wide heads where the width allows it, otherwise the largest divisor of `hidden_dim` up to 64."""
    if hidden_dim % 64 == 0:
        return hidden_dim // 64
    for head_dim in range(min(64, hidden_dim), 0, -1):
        if hidden_dim % head_dim == 0:
            return hidden_dim // head_dim
    return 1


class QueryAttention(nn.Module):
    """Bidirectional multi-head self-attention whose queries can be restricted to some rows."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_dim ({dim})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        n, length, dim = x.shape
        # one qkv matmul for every row (queries of the skipped rows are a few wasted FLOPs, one kernel
        # fewer per sampling step); attention, projection and MLP then run on the asked rows only
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = lambda t: t.reshape(n, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q[:, rows]), heads(k), heads(v))
        return self.proj(out.transpose(1, 2).reshape(n, -1, dim))


class QueryBlock(nn.Module):
    """Pre-norm transformer block (timm ViT layout and numerics) that can compute only the rows it is asked for.

    The last block of each query transformer only needs the outputs of some rows (the query token of
    the encoder, the draft slots of the decoder); skipping the others halves the encoder's work.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = QueryAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        x = x[:, rows] + self.attn(self.norm1(x), rows)
        return x + self.mlp(self.norm2(x))


class _QueryTransformer(nn.Module):
    """In-projection, `depth` query blocks and a final LayerNorm at width `hidden_dim`."""

    def __init__(self, dim: int, hidden_dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(QueryBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim)

    def mix(self, tokens: torch.Tensor, rows: slice) -> torch.Tensor:
        """Run the blocks; the last one computes only `rows` (earlier ones feed every row onward)."""
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.norm(self.blocks[-1](tokens, rows))


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TensorEncoder(_QueryTransformer):
    """Compress a window of `k` token embeddings `[..., k, dim]` into one residual update `[..., dim]`."""

    def __init__(self, dim: int, window: int, hidden_dim: int, depth: int = 1, num_heads: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__(dim, hidden_dim, depth, num_heads or default_num_heads(hidden_dim), mlp_ratio)
        self.window = window
        self.query = nn.Parameter(torch.randn(hidden_dim) * 0.02)
        self.slot_embed = nn.Parameter(torch.randn(window, hidden_dim) * 0.02)
        #: stands in for the base embedding of slots past the last image position
        self.pad_embedding = nn.Parameter(torch.zeros(dim))
        self.out_proj = _zero_linear(hidden_dim, dim)

    def forward(self, slot_embeddings: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`pad_mask` `[..., k]` marks slots past the last image position: they use `pad_embedding`."""
        if pad_mask is not None:
            pad = self.pad_embedding.to(slot_embeddings.dtype)
            slot_embeddings = torch.where(pad_mask[..., None], pad, slot_embeddings)
        lead = slot_embeddings.shape[:-2]
        tokens = self.in_proj(slot_embeddings.flatten(0, -3)) + self.slot_embed
        query = self.query.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        mixed = self.mix(torch.cat([query, tokens], dim=1), slice(0, 1))
        return self.out_proj(mixed[:, 0]).reshape(*lead, -1)


class TensorDecoder(_QueryTransformer):
    """Expand hidden states `[..., dim]` into `k` slot hidden states `[..., k, dim]`; slot 0 is the input."""

    def __init__(self, dim: int, window: int, hidden_dim: int, depth: int = 1, num_heads: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__(dim, hidden_dim, depth, num_heads or default_num_heads(hidden_dim), mlp_ratio)
        self.window = window
        self.in_norm = nn.LayerNorm(dim)
        self.slot_embed = nn.Parameter(torch.randn(window, hidden_dim) * 0.02)
        self.out_proj = _zero_linear(hidden_dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        tokens = self.in_proj(self.in_norm(flat))[:, None, :] + self.slot_embed
        updates = self.out_proj(self.mix(tokens, slice(1, None)))  # [N, k-1, dim]
        slots = torch.cat([flat[:, None, :], flat[:, None, :] + updates.to(flat.dtype)], dim=1)
        return slots.reshape(*lead, self.window, -1)
