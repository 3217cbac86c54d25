"""TensorAR's input encoder and output decoder: small query transformers around the base model.

Both are residual branches whose last projection starts at zero, so a freshly wrapped model computes
exactly what the base model computes; fine-tuning then grows them from there.

* `TensorEncoder`: the `k` embeddings of an input window (plus slot embeddings) and one learned
  query go through `depth` bidirectional blocks; the query's output, projected back to the model
  width, is added to the base embedding of the window's first token.
* `TensorDecoder`: one backbone hidden state is copied into `k` slot tokens (plus slot embeddings),
  mixed by `depth` blocks, and projected to `k` residual updates of that hidden state. Slot 0 gets
  no update: its logits are always the base model's own.

Both work at an inner width `hidden_dim` (default half the model width) to keep the overhead near
the paper's +4.6% of LlamaGen-B.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
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


class _QueryTransformer(nn.Module):
    """In-projection, `depth` pre-norm ViT blocks (timm) and a final LayerNorm at width `hidden_dim`."""

    def __init__(self, dim: int, hidden_dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.in_proj = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            Block(hidden_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_dim)

    def mix(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


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

    def forward(self, slot_embeddings: torch.Tensor) -> torch.Tensor:
        lead = slot_embeddings.shape[:-2]
        tokens = self.in_proj(slot_embeddings.flatten(0, -3)) + self.slot_embed
        query = self.query.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        mixed = self.mix(torch.cat([query, tokens], dim=1))
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
        updates = self.out_proj(self.mix(tokens)[:, 1:])  # [N, k-1, dim]
        slots = torch.cat([flat[:, None, :], flat[:, None, :] + updates.to(flat.dtype)], dim=1)
        return slots.reshape(*lead, self.window, -1)
