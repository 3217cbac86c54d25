"""Wrap your own causal image-token transformer with TensorAR, without subclassing anything.

A toy class-conditional GPT (learned absolute positions, LayerNorm, GELU MLP) is described to
`ModuleAdapter` by the names of its parts, trained for a few steps with next-tensor prediction, and
sampled with classifier-free guidance. Runs in a few seconds on a CPU:

    python examples/custom_model.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.adapters import ModuleAdapter


class Block(nn.Module):
    """Pre-norm attention + MLP. With a `cache` (a `tensorar_plugin.adapters.KVCache`) it decodes
    incrementally; without one it attends causally over the whole sequence."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, input_pos=None, cache=None):
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(k, v, input_pos)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class ToyGPT(nn.Module):
    """Class token + image tokens -> next-image-token logits."""

    def __init__(self, vocab=64, classes=10, dim=32, depth=2, heads=4, length=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.cls = nn.Embedding(classes + 1, dim)  # the extra row is the null class for guidance
        self.pos = nn.Parameter(torch.randn(length + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens, labels):  # logits predicting every image token [B, T, vocab]
        h = torch.cat([self.cls(labels)[:, None], self.tok(tokens[:, :-1])], dim=1)
        h = h + self.pos[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


def toy_adapter(model: ToyGPT, classes: int = 10) -> ModuleAdapter:
    """Name the parts; the null class `classes` is used for condition dropout and guidance."""
    return ModuleAdapter(model, embedding="tok", blocks="blocks", norm="norm", head="out", cond_embedding="cls",
                         pos_embedding="pos", num_cond_tokens=1, null_cond=classes, cond_dropout_prob=0.1,
                         num_classes=classes)


def main() -> None:
    torch.manual_seed(0)
    model = ToyGPT()
    wrapper = TensorARWrapper(model, window=4, adapter=toy_adapter(model))
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=3e-3)
    labels = torch.arange(8) % 10
    tokens = (labels[:, None] * 3 + torch.arange(16)) % 64  # a learnable pattern per class
    wrapper.train()
    for step in range(30):
        loss = wrapper(tokens, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    samples = wrapper.generate(labels[:2], cfg_scale=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    print("sampled tokens:", samples.tolist())


if __name__ == "__main__":
    main()
