"""Adapter for LlamaGen GPTs: our `LlamaGen` and, duck-typed, LlamaGen's original `Transformer`.

Both expose `tok_embeddings`, `cls_embedding`, `tok_dropout`, `layers` (called as
`layer(h, freqs_cis, input_pos, mask)`), `norm`, `output`, `freqs_cis`, `setup_caches`,
`cls_token_num`, `model_type` and `num_classes`; the adapter reproduces the base forward from these
parts operation for operation, so with TensorAR's new parts at their initial values the result is
bit-identical to the base model's own forward.
"""

from __future__ import annotations

import math

import torch

from .base import BackboneAdapter, check_id_tensor, updatable_here

__all__ = ["LlamaGenAdapter"]


class LlamaGenAdapter(BackboneAdapter):
    """Drives a LlamaGen-style GPT (ours, or an instance of the reference `Transformer`)."""

    required_attributes = ("tok_embeddings", "cls_embedding", "tok_dropout", "layers", "norm", "output",
                           "freqs_cis", "setup_caches", "cls_token_num", "model_type")

    def __init__(self, model):
        super().__init__(model)
        if model.model_type == "c2i" and int(model.cls_token_num) != 1:
            raise ValueError(f"a class-conditional LlamaGen model needs cls_token_num == 1 (its label embedding "
                             f"is one token), got cls_token_num={model.cls_token_num}")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.tok_embeddings.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.model.output.out_features

    @property
    def max_image_tokens(self) -> int:
        block = getattr(self.model, "block_size", None)
        return int(block) if block is not None else self.model.freqs_cis.shape[0] - self.num_cond_tokens

    @property
    def num_cond_tokens(self) -> int:
        return int(self.model.cls_token_num)

    @property
    def model_type(self) -> str:
        return self.model.model_type

    @property
    def num_classes(self) -> int | None:
        return int(self.model.num_classes) if self.model_type == "c2i" else None

    @property
    def has_null_condition(self) -> bool:
        if self.model_type == "c2i":
            return self.model.cls_embedding.embedding_table.num_embeddings > self.model.num_classes
        return hasattr(self.model.cls_embedding, "uncond_embedding")

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.max_image_tokens)

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.tok_embeddings.weight

    # -- compute -----------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(ids)

    def embed_condition(self, cond, *, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.model_type == "c2i":
            cond = cond.long()  # int32 / uint8 labels: nn.Embedding takes int64 ids (no copy when they are)
        else:  # caption features made in another dtype (T5 runs in bf16) meet the projection in its own
            cond = cond.to(self.model.cls_embedding.cap_proj.fc1.weight.dtype)
        emb = self.model.cls_embedding(cond, train=train, force_drop_ids=force_drop_ids)
        return emb[:, : self.num_cond_tokens]

    def null_condition(self, cond):
        if not self.has_null_condition:
            return super().null_condition(cond)
        if self.model_type == "c2i":
            return torch.full_like(cond, self.model.num_classes)
        uncond = self.model.cls_embedding.uncond_embedding[: cond.shape[1]]
        return uncond.to(cond.dtype).expand_as(cond).clone()

    def _uses_our_cache(self) -> bool:
        from ..models.llamagen import LlamaGen

        return isinstance(self.model, LlamaGen)

    cuts_long_conditions = True  # caption features [B, L >= cls_token_num, D] keep their first cls_token_num

    def condition_mask_supported(self) -> bool:
        return True

    def _masked_causal(self, length: int, cond_mask: torch.Tensor) -> torch.Tensor:
        """`[B, length, length]` causal mask whose condition columns follow `cond_mask` `[B, n_cond]`
        (1 = real token); the diagonal stays visible so padded rows still attend to themselves.
        Same rule as LlamaGen's `generate(emb_masks=...)`."""
        mask = torch.ones(length, length, dtype=torch.bool, device=cond_mask.device).tril()
        mask = mask.expand(cond_mask.shape[0], -1, -1).clone()
        n_cond = cond_mask.shape[1]
        mask[:, :, :n_cond] &= cond_mask.bool()[:, None, :]
        return mask | torch.eye(length, dtype=torch.bool, device=cond_mask.device)

    @property
    def supports_kv_len(self) -> bool:  # our attention reads as many keys as the mask is long
        return self._uses_our_cache()

    def forward_hidden(self, embeddings: torch.Tensor, input_pos: torch.Tensor | None = None,
                       cond_mask: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        model = self.model
        if input_pos is None and not self._uses_our_cache() and model.layers[0].attention.kv_cache is not None:
            self.clear_caches()  # the reference attention would write a cached forward into its cache
        h = model.tok_dropout(embeddings)
        freqs = model.freqs_cis
        if freqs.device != h.device:
            freqs = freqs.to(h.device)
            model.freqs_cis = freqs
        if input_pos is None:
            freqs, mask = freqs[: h.shape[1]], None
            if cond_mask is not None:
                mask = self._masked_causal(h.shape[1], cond_mask)[:, None]
        else:
            freqs, mask = freqs[input_pos], model.causal_mask[: h.shape[0], None, input_pos]
            if kv_len is not None and self.supports_kv_len:
                mask = mask[..., :kv_len]
        for layer in model.layers:
            h = layer(h, freqs, input_pos, mask)
        return h

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.output(self.model.norm(hidden)).float()

    def setup_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None,
                     cond_mask: torch.Tensor | None = None) -> None:
        # Reuse is decided from the model's own caches and mask, never from a record kept here: several
        # adapters (a wrapper, `sample_plain`, LlamaGen's own `generate`) may drive one model in turn.
        dtype = dtype or self.dtype
        cache = self.model.layers[0].attention.kv_cache
        mask = getattr(self.model, "causal_mask", None)
        reusable = (cache is not None and mask is not None and cache.k_cache.dtype == dtype
                    and cache.k_cache.device == self.device and cache.k_cache.shape[0] == batch_size
                    and cache.k_cache.shape[2] >= max_seq_length and mask.shape[0] == batch_size
                    and mask.shape[-1] == cache.k_cache.shape[2] and updatable_here(cache.k_cache))
        if not reusable:  # static caches are reused: stale entries past the current position are masked out
            with torch.device(self.device):  # the reference allocates on the default device
                self.model.setup_caches(batch_size, max_seq_length, dtype)
        # rewrite the mask every call (one small copy): a previous call, by any driver, may have masked it
        length = self.model.causal_mask.shape[-1]
        if cond_mask is not None:
            self.model.causal_mask.copy_(self._masked_causal(length, cond_mask.to(self.device)))
        else:
            self.model.causal_mask.copy_(torch.ones(length, length, dtype=torch.bool, device=self.device).tril())

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.attention.kv_cache = None

    # -- validation --------------------------------------------------------------------------
    def check_condition(self, cond, batch_size: int | None = None, *, name: str = "cond") -> int:
        super().check_condition(cond, batch_size, name=name)
        if self.model_type == "c2i":
            check_id_tensor(cond, name=name, dims=1, layout="a 1-D integer tensor of class ids", what="class ids",
                            upper=self.model.cls_embedding.embedding_table.num_embeddings)
        else:
            in_dim = self.model.cls_embedding.cap_proj.fc1.in_features
            if cond.dim() != 3 or cond.shape[-1] != in_dim or cond.shape[1] < self.num_cond_tokens:
                raise ValueError(f"{name} must be caption features [B, >= {self.num_cond_tokens}, {in_dim}], "
                                 f"got shape {tuple(cond.shape)}")
            if not cond.dtype.is_floating_point:
                raise ValueError(f"{name} must be floating-point caption features, got dtype {cond.dtype}")
        return cond.shape[0]
