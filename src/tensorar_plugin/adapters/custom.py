"""Adapter for any custom causal transformer, described by naming its parts instead of subclassing.

`ModuleAdapter(model, embedding=..., blocks=..., norm=..., head=..., cond_embedding=...)` takes each
part as an attribute path on `model` ("tok", "decoder.layers"), a module, or any callable, and runs

    h = concat(cond_embedding(cond), embedding(image_ids))        # [B, n_cond + T, d]
    h = h + pos_embedding(positions)                               # optional
    for block in blocks: h = block(h, input_pos=input_pos, cache=cache)
    logits = head(norm(h))

Calling convention of the blocks (``kv_cache=True``, the default): every block is called as
``block(h, input_pos=input_pos, cache=cache)`` and returns the new `h` of the same shape.

* Without a cache (training, uncached sampling) ``input_pos`` and ``cache`` are `None` and the block
  must attend causally over the whole sequence (e.g. ``scaled_dot_product_attention(..., is_causal=True)``).
* With a cache, ``input_pos`` holds the positions `[S]` of the `S` new rows of `h` and ``cache`` is
  this block's `KVCache`: ``k, v, mask = cache.update(k, v, input_pos)`` stores the new keys/values
  `[B, H, S, D]` and returns all of them `[B, H, max_len, D]` with the boolean attention mask
  `[S, max_len]` (True = may attend) to pass as ``attn_mask``.

With ``kv_cache=False`` blocks are called as ``block(h)`` (any causal module, e.g. a
`nn.TransformerEncoderLayer` with a causal mask baked in) and cached decoding is emulated by
re-running the stored prefix each step: simpler, but quadratic in the sequence length.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..checks import is_integer
from .base import BackboneAdapter, check_id_tensor, updatable_here

__all__ = ["KVCache", "ModuleAdapter", "resolve_part"]


def resolve_part(model: nn.Module, spec: Any, what: str) -> Any:
    """`spec` as given (module, callable, tensor), an attribute path on `model` ("a.b.0"), or a
    list/tuple of those composed left to right. `None` stays `None`."""
    if spec is None:
        return None
    if isinstance(spec, str):
        obj: Any = model
        for name in spec.split("."):
            if isinstance(obj, (nn.ModuleList, nn.Sequential)) and name.isdigit():
                obj = obj[int(name)]
            elif hasattr(obj, name):
                obj = getattr(obj, name)
            else:
                raise AttributeError(f"{what}: {type(model).__name__} has no attribute path {spec!r} "
                                     f"({type(obj).__name__} has no {name!r})")
        return obj
    if isinstance(spec, (list, tuple)) and not isinstance(spec, nn.Module):
        parts = [resolve_part(model, s, what) for s in spec]
        if len(parts) == 1:
            return parts[0]
        return _Chain(parts)
    if isinstance(spec, (nn.Module, torch.Tensor)) or callable(spec):
        return spec
    raise TypeError(f"{what} must be an attribute name, a module, a callable or a list of those, "
                    f"got {type(spec).__name__}")


class _Chain:
    """Callables applied one after the other (e.g. a token table, then an aligner)."""

    def __init__(self, parts: Sequence[Callable]):
        self.parts = list(parts)

    def __call__(self, x):
        for part in self.parts:
            x = part(x)
        return x


def _takes_cache_arguments(block: Any) -> bool:
    """Whether `block(h, input_pos=..., cache=...)` can be called (or the signature cannot be read)."""
    try:
        params = inspect.signature(block.forward if isinstance(block, nn.Module) else block).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "input_pos" in params and "cache" in params


def first_tensor(part: Any, attr: str = "weight") -> torch.Tensor | None:
    """A representative parameter of `part` (its `weight`, else its first parameter), for device/dtype."""
    if isinstance(part, _Chain):
        for p in part.parts:
            found = first_tensor(p, attr)
            if found is not None:
                return found
        return None
    if isinstance(part, torch.Tensor):
        return part
    value = getattr(part, attr, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(part, nn.Module):
        return next(part.parameters(), None)
    return None


def out_features(part: Any) -> int | None:
    """Output width of a head: `out_features` of a linear, or of the last linear inside a module."""
    if isinstance(part, _Chain):
        return out_features(part.parts[-1])
    size = getattr(part, "out_features", None)
    if isinstance(size, int):
        return size
    if isinstance(part, nn.Module):
        linears = [m for m in part.modules() if isinstance(getattr(m, "out_features", None), int)]
        if linears:
            return linears[-1].out_features
    return None


def drop_conditions(cond: torch.Tensor, null: torch.Tensor, *, train: bool, prob: float,
                    force_drop_ids: torch.Tensor | None) -> torch.Tensor:
    """LlamaGen-style condition dropout: rows where `force_drop_ids == 1` (or, in training, a random
    `prob` fraction) are replaced by the null condition `null` (same shape as `cond`)."""
    if force_drop_ids is not None:
        drop = force_drop_ids.to(cond.device) == 1
    elif train and prob > 0:
        drop = torch.rand(cond.shape[0], device=cond.device) < prob
    else:
        return cond
    return torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), null.to(cond.dtype), cond)


def checked_dropout_prob(prob: float, null, null_name: str) -> float:
    """Validate a condition-dropout probability: in [0, 1], and > 0 only with a null condition to drop to."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cond_dropout_prob must be in [0, 1], got {prob!r}")
    if prob > 0 and null is None:
        raise ValueError(f"cond_dropout_prob > 0 needs {null_name} (what a dropped condition becomes)")
    return float(prob)


def expand_null(null: torch.Tensor, cond: torch.Tensor, what: str) -> torch.Tensor:
    """One null condition (without or with a batch dimension of 1) repeated to `cond`'s batch."""
    null = null.to(cond.device)
    if null.dim() == cond.dim() - 1:
        null = null.unsqueeze(0)
    if null.dim() != cond.dim() or null.shape[0] != 1 or null.shape[1:] != cond.shape[1:]:
        raise ValueError(f"{what} has shape {tuple(null.shape)}, which does not fit conditions of shape "
                         f"{tuple(cond.shape)} (expected {tuple(cond.shape[1:])} or {(1, *cond.shape[1:])})")
    return null.expand_as(cond).clone()


class KVCache:
    """Static key/value cache of one attention block, handed to the block as ``cache=``.

    ``keys, values, mask = cache.update(k, v, input_pos)`` writes `k`, `v` `[B, H, S, D]` at
    positions `input_pos` `[S]` and returns the whole buffers `[B, H, max_len, D]` and the boolean
    mask `[S, max_len]` (True where the key position is <= the query position), ready for
    ``torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)``. Entries
    past the current position (left from an earlier, longer sequence) are masked out, so a cache is
    reused by simply writing from position 0 again. Buffers are allocated on the first `update`, when
    the number of heads and the head width are known.
    """

    def __init__(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.batch_size, self.max_seq_length = int(batch_size), int(max_seq_length)
        self.dtype, self.device = dtype, device
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        bsz = k.shape[0]
        if bsz > self.batch_size:
            raise ValueError(f"KVCache was set up for batch size {self.batch_size}, got {bsz}")
        if self.keys is None or self.keys.shape[1] != k.shape[1] or self.keys.shape[3] != k.shape[3] \
                or self.values.shape[3] != v.shape[3]:
            dtype, device = self.dtype or k.dtype, k.device if self.device is None else self.device
            shape = (self.batch_size, k.shape[1], self.max_seq_length)
            self.keys = torch.zeros(*shape, k.shape[3], dtype=dtype, device=device)
            self.values = torch.zeros(*shape, v.shape[3], dtype=dtype, device=device)
        keys, values = self.keys[:bsz], self.values[:bsz]
        keys.index_copy_(2, input_pos, k.to(keys.dtype))
        values.index_copy_(2, input_pos, v.to(values.dtype))
        mask = torch.arange(self.max_seq_length, device=input_pos.device)[None, :] <= input_pos[:, None]
        return keys.to(k.dtype), values.to(v.dtype), mask


class ModuleAdapter(BackboneAdapter):
    """Drive a custom causal image-token transformer from its named parts (see the module docstring).

    Args:
        model: the module that owns the parts (its parameters are what the wrapper trains or freezes).
        embedding: image-token ids `[...]` -> embeddings `[..., d]` (e.g. an `nn.Embedding`).
        blocks: a sequence of blocks (an `nn.ModuleList`, a list, an attribute path) or one callable,
            called as described in the module docstring.
        norm: the final norm applied before the head (`None` for none).
        head: hidden states -> logits over the image vocabulary.
        cond_embedding: condition -> `[B, d]` or `[B, num_cond_tokens, d]` (class-label table, text
            projector, any callable). `None`: conditions are given already embedded `[B, L, d]`.
        pos_embedding: optional absolute positions added to the whole sequence before the blocks:
            an `nn.Embedding` / callable on the position ids `[L]`, or a table `[max_len, d]`.
        num_cond_tokens: condition positions in front of the image tokens.
        max_image_tokens: longest image-token sequence (default: `pos_embedding` rows - num_cond_tokens).
        vocab_size / hidden_size: only needed when they cannot be read from `head` / `embedding`.
        null_cond: the null condition for classifier-free guidance: a class id (int), one condition
            tensor, or a callable `cond -> null cond` of the same shape.
        cond_dropout_prob: probability of replacing a condition by `null_cond` in training.
        num_classes: for class-id conditions, ids must lie in [0, num_classes] (the null class included).
        model_type: "c2i" or "t2i" (informative).
        kv_cache: call blocks with a `KVCache` (True) or re-run the prefix each decode step (False).
    """

    @property
    def decode_step_compiles(self) -> bool:
        return self.kv_cache  # without a cache each step re-runs a prefix whose length is read on the host

    @property
    def pos_embedding(self):
        """The position table or module; a table named by attribute path is looked up on every use, so
        `load_state_dict(assign=True)`, `.to()` or `.half()` on the model cannot leave a stale copy here."""
        if isinstance(self._pos_spec, str) and isinstance(self._pos_part, torch.Tensor):
            return resolve_part(self.model, self._pos_spec, "pos_embedding")
        return self._pos_part

    @property
    def _weight(self) -> torch.Tensor | None:
        """A tensor of the model's, read now, for its device and dtype."""
        weight = first_tensor(self.embedding)
        return weight if weight is not None else next(self.model.parameters(), None)

    def __init__(self, model: nn.Module, *, embedding, blocks, norm=None, head, cond_embedding=None,
                 pos_embedding=None, num_cond_tokens: int = 1, max_image_tokens: int | None = None,
                 vocab_size: int | None = None, hidden_size: int | None = None, null_cond=None,
                 cond_dropout_prob: float = 0.0, num_classes: int | None = None, model_type: str = "c2i",
                 kv_cache: bool = True):
        super().__init__(model)
        self.embedding = resolve_part(model, embedding, "embedding")
        if self.embedding is None:
            raise ValueError("embedding is required")
        blocks = resolve_part(model, blocks, "blocks")
        if blocks is None:
            raise ValueError("blocks is required")
        if isinstance(blocks, (nn.ModuleList, list, tuple)):
            self.blocks = list(blocks)
        else:
            self.blocks = [blocks]
        self.norm = resolve_part(model, norm, "norm")
        self.output = resolve_part(model, head, "head")
        if self.output is None:
            raise ValueError("head is required")
        self.cond_embedding = resolve_part(model, cond_embedding, "cond_embedding")
        self._pos_spec = pos_embedding
        self._pos_part = resolve_part(model, pos_embedding, "pos_embedding")
        if not isinstance(num_cond_tokens, int) or num_cond_tokens < 1:
            raise ValueError(f"num_cond_tokens must be an integer >= 1, got {num_cond_tokens!r}")
        self._num_cond = num_cond_tokens
        rows = (self.pos_embedding.shape[0] if isinstance(self.pos_embedding, torch.Tensor)
                else getattr(self.pos_embedding, "num_embeddings", None))
        if max_image_tokens is None:
            if not isinstance(rows, int):
                raise ValueError("max_image_tokens is required unless pos_embedding is a table or an nn.Embedding")
            max_image_tokens = rows - num_cond_tokens
        if not is_integer(max_image_tokens) or max_image_tokens < 1:
            raise ValueError(f"max_image_tokens must be an integer >= 1, got {max_image_tokens!r}")
        if isinstance(rows, int) and num_cond_tokens + max_image_tokens > rows:
            raise ValueError(f"max_image_tokens={max_image_tokens} with num_cond_tokens={num_cond_tokens} needs "
                             f"{num_cond_tokens + max_image_tokens} positions, but pos_embedding has {rows}")
        self._max_image_tokens = int(max_image_tokens)
        self._vocab_size = vocab_size if vocab_size is not None else out_features(self.output)
        if self._vocab_size is None:
            raise ValueError("vocab_size could not be read from head (no out_features): pass vocab_size=")
        if self._weight is None:
            raise ValueError("the model has no parameters to take device and dtype from")
        if hidden_size is None:  # the width of what the embedding hands on: a chain's last part
            last = self.embedding.parts[-1] if isinstance(self.embedding, _Chain) else self.embedding
            hidden_size = getattr(last, "embedding_dim", None) or getattr(last, "out_features", None)
            if hidden_size is None and not isinstance(self.embedding, _Chain) and self._weight.dim() == 2:
                hidden_size = self._weight.shape[1]
        if hidden_size is None:
            raise ValueError("hidden_size could not be read from embedding: pass hidden_size=")
        self._hidden_size = int(hidden_size)
        self._null = null_cond
        self.cond_dropout_prob = checked_dropout_prob(cond_dropout_prob, null_cond, "null_cond")
        self._num_classes = num_classes
        if model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {model_type!r}")
        self._model_type = model_type
        self.kv_cache = bool(kv_cache)
        if self.kv_cache and not _takes_cache_arguments(self.blocks[0]):
            raise ValueError("the blocks take no input_pos / cache arguments (block(h) only): pass kv_cache=False "
                             "to re-run the prefix each decode step, or give the blocks those arguments")
        self._caches: list[KVCache] | None = None
        self._prefix: torch.Tensor | None = None  # kv_cache=False: the sequence fed so far

    # -- sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def vocab_size(self) -> int:
        return int(self._vocab_size)

    @property
    def max_image_tokens(self) -> int:
        return self._max_image_tokens

    @property
    def num_cond_tokens(self) -> int:
        return self._num_cond

    @property
    def model_type(self) -> str:
        return self._model_type

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    @property
    def has_null_condition(self) -> bool:
        return self._null is not None

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self._weight

    # -- compute -----------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def embed_condition(self, cond, *, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.has_null_condition:
            cond = drop_conditions(cond, self.null_condition(cond), train=train, prob=self.cond_dropout_prob,
                                   force_drop_ids=force_drop_ids)
        emb = cond if self.cond_embedding is None else self.cond_embedding(cond)
        if emb.dim() == 2:
            emb = emb.unsqueeze(1)
        if emb.dim() != 3 or emb.shape[1] != self.num_cond_tokens or emb.shape[-1] != self.hidden_size:
            raise ValueError(f"the condition embedding must be [B, {self.num_cond_tokens}, {self.hidden_size}] "
                             f"(or [B, {self.hidden_size}] for one token; num_cond_tokens={self.num_cond_tokens}), "
                             f"got {tuple(emb.shape)}")
        return emb

    def null_condition(self, cond):
        if self._null is None:
            return super().null_condition(cond)
        if is_integer(self._null):
            return torch.full_like(cond, self._null)
        if isinstance(self._null, torch.Tensor):
            return expand_null(self._null, cond, "null_cond")
        null = self._null(cond)
        if null.shape != cond.shape:
            raise ValueError(f"null_cond returned shape {tuple(null.shape)} for conditions {tuple(cond.shape)}")
        return null

    def _positions(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.pos_embedding is None:
            return h
        if isinstance(self.pos_embedding, torch.Tensor):
            return h + self.pos_embedding[positions].to(h.dtype)
        return h + self.pos_embedding(positions).to(h.dtype)

    def _run_blocks(self, h: torch.Tensor, input_pos=None, caches=None) -> torch.Tensor:
        if not self.kv_cache:
            for block in self.blocks:
                h = block(h)
            return h
        for i, block in enumerate(self.blocks):
            h = block(h, input_pos=input_pos, cache=None if caches is None else caches[i])
        return h

    def forward_hidden(self, embeddings: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        length = embeddings.shape[1]
        if input_pos is None:
            h = self._positions(embeddings, torch.arange(length, device=embeddings.device))
            return self._run_blocks(h)
        h = self._positions(embeddings, input_pos)
        if self.kv_cache:  # no host synchronisation here, so the decode step can be compiled
            if self._caches is None:
                raise RuntimeError("forward_hidden with input_pos needs setup_caches first")
            return self._run_blocks(h, input_pos, self._caches)
        if self._prefix is None:
            raise RuntimeError("forward_hidden with input_pos needs setup_caches first")
        prefix = self._prefix[: h.shape[0]]
        prefix[:, input_pos] = h.to(prefix.dtype)
        end = int(input_pos.max()) + 1
        return self._run_blocks(prefix[:, :end].to(h.dtype))[:, input_pos]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.output(hidden).float()

    def setup_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        dtype = dtype or self.dtype
        if self.kv_cache:
            caches = self._caches
            if caches is not None and caches[0].batch_size == batch_size \
                    and caches[0].max_seq_length >= max_seq_length and caches[0].dtype == dtype \
                    and caches[0].device == self.device and updatable_here(caches[0].keys):
                return  # reused: stale entries past the current position are masked out
            self._caches = [KVCache(batch_size, max_seq_length, dtype, self.device) for _ in self.blocks]
        else:
            self._prefix = torch.zeros(batch_size, max_seq_length, self.hidden_size, dtype=dtype,
                                       device=self.device)

    def clear_caches(self) -> None:
        self._caches = None
        self._prefix = None

    # -- validation --------------------------------------------------------------------------
    def check_condition(self, cond, batch_size: int | None = None, *, name: str = "cond") -> int:
        super().check_condition(cond, batch_size, name=name)
        if self._num_classes is not None:
            upper = self._num_classes
            if is_integer(self._null):
                upper = max(upper, self._null + 1)
            check_id_tensor(cond, name=name, dims=1, layout="a 1-D integer tensor of class ids", what="class ids",
                            upper=upper)
        elif isinstance(self.cond_embedding, nn.Embedding):  # ids into a table: its rows bound them
            check_id_tensor(cond, name=name, dims=cond.dim(), layout="integer ids into cond_embedding",
                            what="ids", upper=self.cond_embedding.num_embeddings)
        return cond.shape[0]
