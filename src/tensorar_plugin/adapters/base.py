"""The backbone protocol: the few things `TensorARWrapper` needs from a causal image-token transformer.

An adapter holds a reference to the user's model and exposes it through one small interface, so the
wrapper never depends on how a particular model names its parts. To support a new model, subclass
`BackboneAdapter`, implement the abstract methods, and either pass an instance as
`TensorARWrapper(model, adapter=...)` or register it with `register_adapter` (see docs/adapters.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

__all__ = ["BackboneAdapter"]


def check_id_tensor(cond, *, name: str, dims: int, layout: str, what: str, upper: int | None) -> None:
    """`ValueError` naming `name` unless `cond` is an integer tensor with `dims` dimensions whose ids lie in
    `[0, upper)` (`upper=None`: shape and dtype only); `layout` and `what` word the two messages ("a 1-D
    integer tensor of class ids", "class ids")."""
    if cond.dim() != dims or cond.dtype.is_floating_point or cond.dtype == torch.bool:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(cond.shape)} and dtype {cond.dtype}")
    if upper is not None and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= upper):
        raise ValueError(f"{name} holds {what} outside [0, {upper - 1}] "
                         f"(min {int(cond.min())}, max {int(cond.max())})")


def updatable_here(tensor: torch.Tensor | None) -> bool:
    """Can a cache buffer be written in place in the current mode? Buffers made under
    `torch.inference_mode()` cannot be outside it, so such caches must be reallocated, not reused."""
    return tensor is None or not tensor.is_inference() or torch.is_inference_mode_enabled()


#: how each kind of model gets a null condition (for guidance and condition dropout), for error messages
NULL_CONDITION_HINT = ("LlamaGen: class_dropout_prob > 0 (label dropout); HF adapter: uncond_ids=; "
                       "ModuleAdapter: null_cond=")


class BackboneAdapter(ABC):
    """Uniform view of a causal transformer over `[condition tokens] + [image tokens]`.

    Sequences are laid out as `num_cond_tokens` condition positions followed by image positions;
    the hidden state at position `p` predicts the image token at position `p + 1`.
    """

    #: attribute names a model must have for `matches` to accept it (shown in error messages)
    required_attributes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -- detection ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter can drive `model` (duck-typed on `required_attributes` by default)."""
        return bool(cls.required_attributes) and all(hasattr(model, a) for a in cls.required_attributes)

    @classmethod
    def missing_attributes(cls, model: nn.Module) -> list[str]:
        return [a for a in cls.required_attributes if not hasattr(model, a)]

    # -- sizes -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of embeddings and hidden states."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of image-token ids (the codebook size)."""

    @property
    @abstractmethod
    def max_image_tokens(self) -> int:
        """Longest image-token sequence the model supports (its positional range)."""

    @property
    @abstractmethod
    def num_cond_tokens(self) -> int:
        """Number of condition positions before the first image token."""

    @property
    def model_type(self) -> str:
        """"c2i" (class ids) or "t2i" (embedded text features); decides how conditions are checked."""
        return "c2i"

    @property
    def num_classes(self) -> int | None:
        """Number of real classes for c2i models (the null class, if any, is `num_classes`)."""
        return None

    @property
    def has_null_condition(self) -> bool:
        """Whether `null_condition` gives an unconditional input for classifier-free guidance."""
        return False

    @property
    def device(self) -> torch.device:
        return self.embedding_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_weight.dtype

    @property
    @abstractmethod
    def embedding_weight(self) -> torch.Tensor:
        """The image-token embedding matrix (used for device/dtype and parameter counting)."""

    # -- compute -----------------------------------------------------------------------------
    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids `[...]` -> embeddings `[..., hidden_size]` (the base model's own table)."""

    @abstractmethod
    def embed_condition(self, cond, *, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Condition -> embeddings `[B, num_cond_tokens, hidden_size]`, with the base's label dropout if `train`."""

    def null_condition(self, cond):
        """The unconditional counterpart of `cond` (same shape) used for classifier-free guidance."""
        raise NotImplementedError(f"{type(self).__name__} has no null condition: classifier-free guidance "
                                  "needs a model trained with condition dropout")

    #: True when cached `forward_hidden` calls accept `kv_len`: attend to (and read) only the first
    #: `kv_len` cache entries, all of them at or before the new positions. Sampling passes it in buckets
    #: so a decode step reads the filled part of the KV cache, not the whole static cache.
    supports_kv_len: bool = False

    @abstractmethod
    def forward_hidden(self, embeddings: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks on `[B, L, hidden_size]` embeddings; return the hidden states before the final norm.

        With `input_pos=None` the whole sequence is processed causally without a cache; otherwise the
        embeddings sit at positions `input_pos` and the KV cache made by `setup_caches` is used.
        """

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: `[..., hidden_size]` -> float32 logits `[..., vocab_size]`."""

    # plain next-token sampling as a window of one (methods, not lambdas: compiled decode steps are
    # keyed by these functions, and a deep copy of the adapter must get its own)
    def plain_embed_window(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows of one token `[B, L, 1]` -> their base embeddings `[B, L, hidden_size]`."""
        return self.embed_tokens(windows[..., 0])

    def plain_window_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states `[N, hidden_size]` -> logits of a window of one `[N, 1, vocab_size]`."""
        return self.head(hidden)[:, None]

    @abstractmethod
    def setup_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate static KV caches for `batch_size` sequences of up to `max_seq_length` positions."""

    @abstractmethod
    def clear_caches(self) -> None:
        """Free the KV caches."""

    def condition_mask_supported(self) -> bool:
        """Whether `setup_caches` / `forward_hidden` accept `cond_mask` (padded text conditions)."""
        return False

    #: whether the cached decode step runs without host reads, so `generate(compile=True)` can capture it
    #: as one graph (False: compile is refused with a clear error instead of failing inside dynamo)
    decode_step_compiles: bool = True

    #: whether longer conditions are cut to `num_cond_tokens` (LlamaGen's caption features): a condition
    #: mask may then be longer too, and is cut the same way
    cuts_long_conditions: bool = False

    # -- validation --------------------------------------------------------------------------
    def check_condition(self, cond, batch_size: int | None = None, *, name: str = "cond") -> int:
        """Raise `ValueError` naming `name` if `cond` does not fit this model; return its batch size."""
        if not isinstance(cond, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(cond).__name__}")
        if cond.dim() == 0 or cond.shape[0] == 0:
            raise ValueError(f"{name} must hold a batch of at least one condition, got shape {tuple(cond.shape)}")
        if batch_size is not None and cond.shape[0] != batch_size:
            raise ValueError(f"{name} has batch size {cond.shape[0]} but tokens have {batch_size}")
        return cond.shape[0]
