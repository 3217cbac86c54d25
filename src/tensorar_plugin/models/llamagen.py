"""LlamaGen's GPT backbone, rewritten to load LlamaGen's released weights unchanged.

`LlamaGen` has the same state-dict keys and shapes and the same numerics as the `Transformer`
of FoundationVision/LlamaGen (class- and text-conditional), and the same call surface, so it can
be handed to LlamaGen's own `generate()`. Differences from the reference, all fixes:

* the KV cache is sized with `n_kv_head`, so grouped-query configs work with a cache;
* the rotary table and the causal mask are non-persistent buffers: they follow `.to(device)`,
  never enter the state dict, and the rotary table stays float32 under `.to(dtype)`;
* cache buffers are non-persistent, so `state_dict()` never carries `kv_cache` entries;
* a full-sequence forward in eval mode works without `input_pos`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..checks import is_integer

__all__ = [
    "LlamaGenConfig",
    "LlamaGen",
    "build_llamagen",
    "LLAMAGEN_PRESETS",
    "precompute_freqs_cis_2d",
    "apply_rotary_emb",
]


@dataclass
class LlamaGenConfig:
    """Hyper-parameters of a LlamaGen GPT; field names and defaults are those of LlamaGen's `ModelArgs`."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("dim", "n_layer", "n_head", "multiple_of", "vocab_size", "cls_token_num", "block_size"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"LlamaGenConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))  # NumPy integers become ints: the config is saved as JSON
        if self.num_classes < 1:
            raise ValueError(f"LlamaGenConfig.num_classes must be >= 1, got {self.num_classes!r}")
        if self.dim % self.n_head:
            raise ValueError(f"LlamaGenConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4:
            raise ValueError(
                f"LlamaGenConfig.dim / n_head = {self.head_dim} must be divisible by 4 for 2D rotary embeddings"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"LlamaGenConfig.n_kv_head ({self.n_kv_head}) must be >= 1 and divide n_head ({self.n_head})"
            )
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(
                f"LlamaGenConfig.block_size ({self.block_size}) must be a perfect square (an h x w token grid)"
            )
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"LlamaGenConfig.model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError(
                f"LlamaGenConfig.cls_token_num must be 1 for model_type='c2i' (a class label is one token), "
                f"got {self.cls_token_num}"
            )
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                     "drop_path_rate", "class_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"LlamaGenConfig.{name} must be in [0, 1], got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of` (as LlamaGen)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return _round_up(hidden, self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaGenConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LlamaGenConfig field(s): {', '.join(unknown)}")
        return cls(**data)


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


# --------------------------------------------------------------------------------------------
# Rotary position embedding (2D, with zero rows for the condition tokens as in LlamaGen)
# --------------------------------------------------------------------------------------------


def precompute_freqs_cis_2d(
    grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 120
) -> torch.Tensor:
    """Cos/sin table `[cls_token_num + grid_size**2, head_dim // 2, 2]`: rows, then columns, per half.

    The condition rows are all zero, exactly as LlamaGen's table: their queries and keys vanish.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), inv_freq)  # [grid, head_dim/4]
    rows = angles[:, None, :].expand(-1, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, -1, -1)
    grid = torch.cat([rows, cols], dim=-1)  # [grid, grid, head_dim/2]
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of `x` `[B, L, H, D]` by the table rows `[L, D/2, 2]`, in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    table = freqs_cis.view(1, pairs.size(1), 1, pairs.size(3), 2)
    real = pairs[..., 0] * table[..., 0] - pairs[..., 1] * table[..., 1]
    imag = pairs[..., 1] * table[..., 0] + pairs[..., 0] * table[..., 1]
    return torch.stack([real, imag], dim=-1).flatten(3).type_as(x)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, then cast back (LlamaGen numerics)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static key/value cache `[B, n_kv_head, S, head_dim]`, written in place at `input_pos`."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None):
        super().__init__()
        shape = (max_batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k_val: torch.Tensor, v_val: torch.Tensor):
        """Write `[B, H, L, D]` keys/values at positions `input_pos` (length L); return the whole cache."""
        keys, values = self.k_cache[: k_val.shape[0]], self.v_cache[: v_val.shape[0]]  # views: writes land in the cache
        keys.index_copy_(2, input_pos, k_val.to(keys.dtype))
        values.index_copy_(2, input_pos, v_val.to(values.dtype))
        return keys, values


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) causal self-attention with a fused qkv projection."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.dim = config.dim
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_kv_head, self.head_dim), freqs_cis)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))

        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if mask is not None:  # read only as many keys as the mask covers (sampling passes shorter masks)
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then SwiGLU, each with a residual (and optional drop-path)."""

    def __init__(self, config: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, input_pos, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# --------------------------------------------------------------------------------------------
# Condition embedders
# --------------------------------------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class-label embedding with an extra null class (`num_classes`) used for label dropout / CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    """Two bias-free linears with tanh-GELU: projects text-encoder features to the model width."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Text-feature projection with a learned unconditional caption (`uncond_embedding`) for CFG."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = CaptionMLP(in_channels, hidden_size, hidden_size)
        self.register_buffer("uncond_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = force_drop_ids == 1
        uncond = self.uncond_embedding[: caption.shape[1]].to(caption.dtype)
        return torch.where(drop[:, None, None], uncond, caption)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.cap_proj(caption)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class LlamaGen(nn.Module):
    """LlamaGen GPT: condition tokens, then image tokens, predicted left to right.

    `forward(idx, cond_idx, input_pos=None, targets=None, mask=None, valid=None)` has LlamaGen's
    three modes: training / full sequence (both given), prefill (`idx=None`) and one-step decode
    (`cond_idx=None`); the last two need `setup_caches` first.
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.num_classes = config.num_classes
        self.model_type = config.model_type
        self.cls_token_num = config.cls_token_num
        if config.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        else:
            token_num = max(120, config.cls_token_num)
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob,
                                                 token_num)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)

        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        self.register_buffer("causal_mask", None, persistent=False)
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.initialize_weights()

    # -- construction helpers --------------------------------------------------------------
    def _rope_table(self, device: torch.device | None = None) -> torch.Tensor:
        cfg = self.config
        table = precompute_freqs_cis_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
        return table.to(device) if device is not None else table

    def initialize_weights(self) -> None:
        """LlamaGen's init: N(0, initializer_range) for linears and embeddings, a zero output head."""
        std = self.config.initializer_range

        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                module.weight.data.normal_(mean=0.0, std=std)
                if module.bias is not None:
                    module.bias.data.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.data.normal_(mean=0.0, std=std)

        self.apply(init)
        nn.init.zeros_(self.output.weight)

    def _apply(self, fn, recurse: bool = True):
        # Keep the rotary table in float32 whatever dtype the weights are cast to (LlamaGen numerics).
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            self.freqs_cis = self._rope_table(self.freqs_cis.device)
        return self

    # -- caches ----------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate static KV caches and the causal mask for `max_batch_size` x `max_seq_length`."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        max_seq_length = _round_up(max_seq_length, 8)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        cfg = self.config
        for block in self.layers:
            block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, cfg.kv_heads, cfg.head_dim,
                                               dtype, device)
        mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.causal_mask = mask.unsqueeze(0).repeat(max_batch_size, 1, 1)
        self.freqs_cis = self._rope_table(device)

    def clear_caches(self) -> None:
        """Free the KV caches and the mask."""
        for block in self.layers:
            block.attention.kv_cache = None
        self.causal_mask = None
        self.max_batch_size = self.max_seq_length = -1

    # -- forward ---------------------------------------------------------------------------
    def embed_condition(self, cond_idx: torch.Tensor) -> torch.Tensor:
        """Condition embeddings `[B, cls_token_num, dim]`, with label dropout in training mode."""
        return self.cls_embedding(cond_idx, train=self.training)[:, : self.cls_token_num]

    def forward(self, idx: torch.Tensor | None, cond_idx: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        if idx is not None and cond_idx is not None:
            emb = torch.cat((self.embed_condition(cond_idx), self.tok_embeddings(idx)), dim=1)
        elif cond_idx is not None:
            emb = self.embed_condition(cond_idx)
        elif idx is not None:
            emb = self.tok_embeddings(idx)
        else:
            raise ValueError("forward needs idx, cond_idx or both")
        cached = input_pos is not None and self.layers[0].attention.kv_cache is not None
        if (idx is None or cond_idx is None) and not cached:
            raise ValueError("prefill/decode (idx or cond_idx is None) needs input_pos and setup_caches() first")
        if cached and mask is None:
            mask = self.causal_mask[: emb.shape[0], None, input_pos]
        h = self.tok_dropout(emb)
        freqs_cis = self.freqs_cis[input_pos] if input_pos is not None else self.freqs_cis[: emb.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos if cached else None, mask)
        logits = self.output(self.norm(h)).float()
        if self.training:
            logits = logits[:, self.cls_token_num - 1:].contiguous()

        loss = None
        if valid is not None:
            per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction="none")
            weight = valid[:, None].repeat(1, targets.shape[1]).view(-1)
            loss = (per_token * weight).sum() / max(weight.sum(), 1)
        elif targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def get_fsdp_wrap_module_list(self) -> list[nn.Module]:
        return list(self.layers)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: depth, heads and width of LlamaGen's named GPTs (parameter counts at vocab 16384, c2i).
LLAMAGEN_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1.2B (t2i)
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B (t2i)
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),  # 6.6B (t2i)
}


def build_llamagen(preset: str, **overrides: Any) -> LlamaGen:
    """Build a named LlamaGen GPT (e.g. "GPT-B"); `overrides` set any other `LlamaGenConfig` field."""
    if preset not in LLAMAGEN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(LLAMAGEN_PRESETS)}")
    known = {f.name for f in fields(LlamaGenConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown LlamaGenConfig field(s) in overrides: {', '.join(unknown)}")
    return LlamaGen(LlamaGenConfig(**{**LLAMAGEN_PRESETS[preset], **overrides}))
