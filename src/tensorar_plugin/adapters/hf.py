"""Adapter for Hugging Face `transformers` causal language models (optional extra `tensorar-plugin[hf]`).

`HFCausalLMAdapter` drives any `PreTrainedModel` with a causal LM head (`LlamaForCausalLM`,
`Qwen2ForCausalLM`, `GPT2LMHeadModel`, ...) through its public interface only: the decoder is
called with `inputs_embeds`, `position_ids`, `attention_mask` (only for padded prompts, from
`cond_mask`), the KV cache (the `DynamicCache` the model creates and returns, or a `StaticCache`;
passed and read back as `cache` where the forward takes that name, transformers 5's rename, else as
`past_key_values`) and, on versions whose forward still takes it, `cache_position`. Image tokens are a
range of the LM vocabulary (`image_token_offset`, `image_vocab_size`) or have their own embedding
and head (Janus-style `gen_embed` / `gen_head`).

Hidden states and the final norm: `forward_hidden` returns the decoder's hidden states *before*
the final norm, read non-invasively by a forward hook on the norm module (found by name: `norm`,
`ln_f`, `final_layernorm`, ... or given as `final_norm=`); `head` applies that norm and then the
projection, so `head(forward_hidden(x))` is exactly the model's own logits. With `final_norm=None`
(or when no final norm is found) `forward_hidden` returns the decoder's output (after its norm) and
`head` is the projection alone; this is still exact for the base model, and TensorAR's decoder then
works on normalised states.

`transformers` is imported lazily: importing `tensorar_plugin` never needs it, and detection
(`HFCausalLMAdapter.matches`) looks at class names only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import is_integer
from .base import BackboneAdapter, check_id_tensor
from .custom import checked_dropout_prob, drop_conditions, expand_null, first_tensor, out_features, resolve_part

__all__ = ["HFCausalLMAdapter", "is_hf_causal_lm"]

#: names under which decoders keep their final norm (searched on the decoder, then its language model)
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm", "ln_out")
CONDITION_MODES = ("prefix", "embeds")
CACHE_KINDS = ("dynamic", "static")
STATIC_CACHE_MIN_VERSION = (4, 48)  # oldest version whose StaticCache these tests confirm


def is_hf_causal_lm(model: Any) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` with an LM head (decided without importing transformers)."""
    is_pretrained = any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
                        for cls in type(model).__mro__)
    if not is_pretrained or not hasattr(model, "get_output_embeddings"):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return model.get_output_embeddings() is not None
    except (NotImplementedError, AttributeError):
        return False


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("HFCausalLMAdapter needs transformers: pip install 'tensorar-plugin[hf]'") from exc
    return transformers


class HFCausalLMAdapter(BackboneAdapter):
    """Drive a transformers causal LM as a TensorAR backbone.

    Sequences are `[prompt tokens] + [image tokens]`: the condition is a prompt of `num_cond_tokens`
    positions, image token `i` is fed as the embedding of vocabulary id `image_token_offset + i` (or
    row `i` of `image_embedding`) and predicted by logits `offset .. offset + image_vocab_size` of the
    LM head (or by `image_head`).

    Args:
        model: a `PreTrainedModel` with a causal LM head.
        image_token_offset: vocabulary id of image token 0 in the LM's own embedding and head.
        image_vocab_size: number of image tokens (default: what `image_head` outputs, else the rest of
            the LM vocabulary after the offset).
        image_embedding: a separate image-token embedding (Janus `gen_embed`): a module, callable,
            attribute path, or a list of those applied in order (e.g. `["gen_embed", "gen_aligner"]`);
            indexed from 0 (the offset applies to the LM's own table only).
        image_head: a separate image head (Janus `gen_head`) applied to the normed hidden states.
        condition: "prefix": conditions are prompt token ids `[B, L]` embedded by the LM's input
            embeddings (text or class prompts); "embeds": conditions are embeddings `[B, L, d]` fed
            as they are; or a callable `cond -> [B, L, d]` (then `num_cond_tokens` is required).
        num_cond_tokens: prompt length `L`. Default: the length of `uncond_ids`, else the length of
            the first condition seen (every later condition must have the same length; pad prompts).
        uncond_ids: the null prompt for classifier-free guidance, `[L]` or `[1, L]` (for "embeds",
            one null condition `[L, d]`); without it `null_condition` raises.
        cond_dropout_prob: in training, replace this fraction of conditions by `uncond_ids`.
        max_image_tokens: longest image-token sequence (default: the model's positional range minus
            `num_cond_tokens`; pass the real image length, e.g. 576 for a 24x24 token grid).
        decoder: the module run on `inputs_embeds` (default `model.base_model`, e.g. `model.model`).
        final_norm: "auto" (find it by name), a module / attribute path, or `None` (see module docs).
        cache: "dynamic" (`DynamicCache`, default), "static" (`StaticCache`), or a callable
            `(model, batch_size, max_seq_length, dtype) -> Cache`.
        check_logits: run one 2-token forward when built to check that `head(forward_hidden(...))` gives the
            model's own logits (False skips it, e.g. for a head whose post-processing is intended to differ).
    """

    required_attributes = ("config", "get_input_embeddings", "get_output_embeddings", "base_model")

    def __init__(self, model: nn.Module, *, image_token_offset: int = 0, image_vocab_size: int | None = None,
                 image_embedding=None, image_head=None, condition="prefix", num_cond_tokens: int | None = None,
                 uncond_ids: torch.Tensor | None = None, cond_dropout_prob: float = 0.0,
                 max_image_tokens: int | None = None, decoder=None, final_norm="auto", cache="dynamic",
                 check_logits: bool = True):
        super().__init__(model)
        if not is_hf_causal_lm(model) and not (image_head is not None and hasattr(model, "get_input_embeddings")):
            raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel with a causal LM head "
                            "(give image_head= for models without one); use ModuleAdapter for custom models")
        self.text_config = self._text_config(model)
        self.decoder = resolve_part(model, decoder, "decoder") if decoder is not None else model.base_model
        if self.decoder is model:
            raise ValueError(f"could not find the decoder of {type(model).__name__} (base_model is the model "
                             "itself): pass decoder=")
        self.input_embeddings: nn.Module = self._get(model, "get_input_embeddings")
        if self.input_embeddings is None:
            self.input_embeddings = self._get(self.decoder, "get_input_embeddings")
        if self.input_embeddings is None:
            raise ValueError(f"could not find the input embeddings of {type(model).__name__}")
        self.lm_head = self._get(model, "get_output_embeddings")
        self.image_embedding = resolve_part(model, image_embedding, "image_embedding")
        self.image_head = resolve_part(model, image_head, "image_head")
        if final_norm == "auto":
            self.final_norm = self._find_final_norm(self.decoder)
        else:
            self.final_norm = resolve_part(model, final_norm, "final_norm")
        if self.final_norm is not None and not isinstance(self.final_norm, nn.Module):
            raise TypeError("final_norm must be a module (its forward hook gives the pre-norm hidden states)")

        if not is_integer(image_token_offset) or image_token_offset < 0:
            raise ValueError(f"image_token_offset must be an integer >= 0, got {image_token_offset!r}")
        self.image_token_offset = int(image_token_offset)
        uses_lm_vocab = self.image_embedding is None or self.image_head is None
        lm_vocab = self._lm_vocab_size() if uses_lm_vocab else None
        if image_vocab_size is None:
            if self.image_head is not None:
                image_vocab_size = out_features(self.image_head)
            elif self.image_embedding is not None:
                image_vocab_size = getattr(self.image_embedding, "num_embeddings", None)
            else:
                image_vocab_size = lm_vocab - image_token_offset
            if image_vocab_size is None:
                raise ValueError("image_vocab_size could not be read from image_head: pass image_vocab_size=")
        if image_vocab_size < 1:
            raise ValueError(f"image_vocab_size must be >= 1, got {image_vocab_size!r} "
                             f"(LM vocabulary {lm_vocab}, offset {image_token_offset})")
        if uses_lm_vocab and image_token_offset + image_vocab_size > lm_vocab:
            raise ValueError(f"image tokens {image_token_offset}..{image_token_offset + image_vocab_size - 1} do not "
                             f"fit the LM vocabulary of {lm_vocab} ids")
        head_width = getattr(self.image_head, "out_features", None)  # only a head that states its own width
        if isinstance(head_width, int) and head_width != image_vocab_size:
            raise ValueError(f"image_vocab_size={image_vocab_size}, but image_head outputs {head_width} logits")
        self.image_vocab_size = int(image_vocab_size)

        if self.image_head is None and self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no LM head: pass image_head=")
        if not (condition in CONDITION_MODES or callable(condition)):
            raise ValueError(f"condition must be one of {CONDITION_MODES} or a callable, got {condition!r}")
        self.condition = condition
        if uncond_ids is not None:
            uncond_ids = torch.as_tensor(uncond_ids)
        if uncond_ids is not None and not callable(condition):  # its length is the prompt length
            if uncond_ids.dim() == (2 if condition == "prefix" else 3) and uncond_ids.shape[0] == 1:
                uncond_ids = uncond_ids[0]
            if condition == "prefix":  # a meta tensor holds no values: its ids are checked by shape and dtype only
                upper = self._prompt_vocab_size() if uncond_ids.device.type != "meta" else None
                check_id_tensor(uncond_ids, name="uncond_ids", dims=1, what="token ids", upper=upper,
                                layout="the null prompt's token ids [L] or [1, L] (an integer tensor)")
            elif uncond_ids.dim() != 2 or not uncond_ids.dtype.is_floating_point:
                raise ValueError(f"uncond_ids must be one null condition [L, d] (or [1, L, d]) of embeddings, got "
                                 f"shape {tuple(uncond_ids.shape)} and dtype {uncond_ids.dtype}")
            inferred = uncond_ids.shape[0]
            if num_cond_tokens is not None and num_cond_tokens != inferred:
                raise ValueError(f"uncond_ids has {inferred} positions but num_cond_tokens={num_cond_tokens}")
            num_cond_tokens = inferred
        if callable(condition) and num_cond_tokens is None:
            raise ValueError("a callable condition needs num_cond_tokens=")
        if num_cond_tokens is not None and (not is_integer(num_cond_tokens) or num_cond_tokens < 1):
            raise ValueError(f"num_cond_tokens must be an integer >= 1, got {num_cond_tokens!r}")
        self._num_cond = None if num_cond_tokens is None else int(num_cond_tokens)
        self.uncond_ids = uncond_ids
        self.cond_dropout_prob = checked_dropout_prob(cond_dropout_prob, uncond_ids, "uncond_ids")

        self.max_positions = self._max_positions()
        if max_image_tokens is not None and (not is_integer(max_image_tokens) or max_image_tokens < 1):
            raise ValueError(f"max_image_tokens must be an integer >= 1, got {max_image_tokens!r}")
        if max_image_tokens is None and self.max_positions is None:
            raise ValueError(f"{type(model).__name__}'s config gives no positional range: pass max_image_tokens=")
        cond_len = self._num_cond if self._num_cond is not None else 1
        if max_image_tokens is not None and self.max_positions is not None \
                and cond_len + max_image_tokens > self.max_positions:
            raise ValueError(f"max_image_tokens={max_image_tokens} with {cond_len} condition token(s) needs "
                             f"{cond_len + max_image_tokens} positions, but {type(model).__name__} has "
                             f"{self.max_positions}")
        self._max_image_tokens = None if max_image_tokens is None else int(max_image_tokens)

        if not (cache in CACHE_KINDS or callable(cache)):
            raise ValueError(f"cache must be one of {CACHE_KINDS} or a callable, got {cache!r}")
        self.cache_kind = cache
        forward_params = inspect.signature(self.decoder.forward).parameters
        self._takes_cache_position = "cache_position" in forward_params
        # transformers 5 renames `past_key_values` to `cache` (argument and output field; the old name warns
        # and is to be removed): use whichever name this version's forward declares
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        self._cache = None
        self._cond_mask: torch.Tensor | None = None
        self._cache_args: tuple[int, int, torch.dtype] | None = None
        self._seen = 0  # positions held by the cache
        if check_logits:
            self._check_logits_match_the_model()

    # -- detection ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_hf_causal_lm(model)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _text_config(model):
        config = model.config
        getter = getattr(config, "get_text_config", None)
        if getter is not None:
            try:
                return getter(decoder=True)
            except TypeError:
                return getter()
        return config

    @staticmethod
    def _get(module: nn.Module, getter: str) -> nn.Module | None:
        try:
            return getattr(module, getter)()
        except (AttributeError, NotImplementedError):
            return None

    @staticmethod
    def _find_final_norm(decoder: nn.Module) -> nn.Module | None:
        candidates = [decoder]
        for name in ("language_model", "text_model", "decoder"):
            inner = getattr(decoder, name, None)
            if isinstance(inner, nn.Module):
                candidates.append(inner)
        for module in candidates:
            for name in FINAL_NORM_NAMES:
                norm = getattr(module, name, None)
                if isinstance(norm, nn.Module):
                    return norm
        return None

    def _lm_vocab_size(self) -> int:
        size = out_features(self.lm_head)
        if size is None:
            size = getattr(self.text_config, "vocab_size", None)
        if size is None:
            raise ValueError("could not read the LM vocabulary size")
        return int(size)

    def _max_positions(self) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # -- sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        weight = getattr(self.input_embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[1])
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return self.image_vocab_size

    @property
    def num_cond_tokens(self) -> int:
        if self._num_cond is None:
            raise RuntimeError("num_cond_tokens is not known yet: pass num_cond_tokens= (or uncond_ids=) to "
                               "HFCausalLMAdapter, or give a condition first")
        return self._num_cond

    @property
    def max_image_tokens(self) -> int:
        if self._max_image_tokens is not None:
            return self._max_image_tokens
        return self.max_positions - (self._num_cond if self._num_cond is not None else 1)

    @property
    def model_type(self) -> str:
        return "t2i"

    @property
    def has_null_condition(self) -> bool:
        return self.uncond_ids is not None

    @property
    def embedding_weight(self) -> torch.Tensor:
        weight = first_tensor(self.image_embedding) if self.image_embedding is not None else None
        return weight if weight is not None else self.input_embeddings.weight

    # -- compute -----------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.image_embedding is not None:
            return self.image_embedding(ids)
        return self.input_embeddings(ids + self.image_token_offset if self.image_token_offset else ids)

    def _lock_length(self, length: int, name: str = "cond") -> None:
        if self._num_cond is None:
            self._num_cond = int(length)
        elif length != self._num_cond:
            raise ValueError(f"{name} has {length} prompt positions, but this adapter uses num_cond_tokens="
                             f"{self._num_cond}: pad or trim prompts to that length")

    def embed_condition(self, cond, *, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.has_null_condition:
            cond = drop_conditions(cond, self.null_condition(cond), train=train, prob=self.cond_dropout_prob,
                                   force_drop_ids=force_drop_ids)
        if self.condition == "prefix":
            self._lock_length(cond.shape[1])
            return self.input_embeddings(cond)
        if self.condition == "embeds":
            self._lock_length(cond.shape[1])
            return cond.to(self.dtype)
        emb = self.condition(cond)
        if emb.dim() != 3 or emb.shape[1] != self.num_cond_tokens or emb.shape[2] != self.hidden_size:
            raise ValueError(f"the condition callable must return [B, {self.num_cond_tokens}, {self.hidden_size}], "
                             f"got {tuple(emb.shape)}")
        return emb

    def null_condition(self, cond):
        if self.uncond_ids is None:
            return super().null_condition(cond)
        return expand_null(self.uncond_ids, cond, "uncond_ids")

    def _run_decoder(self, embeddings: torch.Tensor, positions: torch.Tensor, cached: bool, cache,
                     attention_mask: torch.Tensor | None = None):
        """Run the decoder; return the hidden states (pre-norm when the final norm is known) and the cache."""
        kwargs = dict(inputs_embeds=embeddings, position_ids=positions[None].expand(embeddings.shape[0], -1),
                      use_cache=cached)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if cached:
            if cache is not None:  # None: the model makes its own (dynamic) cache on the first call
                kwargs[self._cache_name] = cache
            if self._takes_cache_position:
                kwargs["cache_position"] = positions
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(module, args, kw, output):
            seen.append((args[0] if args else next(iter(kw.values())), output))

        handle = None if self.final_norm is None else self.final_norm.register_forward_hook(capture, with_kwargs=True)
        try:
            out = self.decoder(**kwargs)
        finally:
            if handle is not None:
                handle.remove()
        last = out[0]
        # keep the cache the model returns: older transformers copy a passed Cache into a new object or use
        # legacy tuples, newer ones return the object they were given
        returned = getattr(out, self._cache_name, None) if cached else None
        cache = returned if returned is not None else cache
        if self.final_norm is None:
            return last, cache
        for inp, output in reversed(seen):
            if isinstance(output, torch.Tensor) and output.data_ptr() == last.data_ptr() \
                    and output.numel() == last.numel():
                return inp.view(last.shape), cache
        raise RuntimeError(f"the final norm {type(self.final_norm).__name__} of {type(self.model).__name__} did not "
                           "produce the decoder's output, so the pre-norm hidden states cannot be read: pass "
                           "final_norm=<the right module> or final_norm=None")

    def _crop(self, length: int) -> None:
        """Drop cached positions from `length` on (to re-run them)."""
        if self._cache is None:
            return
        if self.cache_kind == "static":  # transformers' StaticCache keeps its own fill count: no rewinding
            raise ValueError(f"input_pos starts at {length}, before the {self._seen} positions a cache='static' "
                             f"holds: a static cache cannot drop positions; feed them in order, start again at "
                             f"0, or use cache='dynamic'")
        if hasattr(self._cache, "crop"):
            self._cache.crop(length - self._seen)
        else:  # legacy tuple of (key, value) per layer
            self._cache = tuple(tuple(t[:, :, :length] for t in layer) for layer in self._cache)

    decode_step_compiles = False  # it reads the position back to the host to drive the HF cache

    def condition_mask_supported(self) -> bool:
        return True

    @staticmethod
    def _attention_mask(cond_mask: torch.Tensor | None, rows: int, end: int, device) -> torch.Tensor | None:
        """transformers' 2-D padding mask `[B, end]`: `cond_mask` over the prompt, 1 for every image position."""
        if cond_mask is None:
            return None
        mask = torch.ones(rows, end, dtype=torch.long, device=device)
        n = min(cond_mask.shape[1], end)
        mask[:, :n] = cond_mask[:rows, :n].to(device=device, dtype=torch.long)
        return mask

    def forward_hidden(self, embeddings: torch.Tensor, input_pos: torch.Tensor | None = None,
                       cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`cond_mask` `[B, num_cond_tokens]` (1 = real prompt token) becomes the model's `attention_mask`;
        cached calls use the mask given to `setup_caches`."""
        length = embeddings.shape[1]
        if input_pos is None:
            positions = torch.arange(length, device=embeddings.device)
            end, cached, cache = length, False, None
        else:
            if self._cache_args is None:
                raise RuntimeError("forward_hidden with input_pos needs setup_caches first")
            positions = input_pos.to(embeddings.device)
            start = int(positions[0])
            end = start + length
            if start == 0 and self._seen:
                self._cache = self._new_cache(*self._cache_args)
            elif start < self._seen:
                self._crop(start)
            elif start > self._seen:
                raise ValueError(f"input_pos starts at {start}, but the cache holds {self._seen} positions: "
                                 "cached positions must be fed in order")
            if end > self._cache_args[1]:
                raise ValueError(f"position {end - 1} is past the cache set up for {self._cache_args[1]} positions")
            cached, cache = True, self._cache
        if self.max_positions is not None and end > self.max_positions:
            raise ValueError(f"position {end - 1} is past {type(self.model).__name__}'s {self.max_positions} "
                             "positions")
        mask = self._attention_mask(self._cond_mask if cached else cond_mask, embeddings.shape[0], end,
                                    embeddings.device)
        hidden, cache = self._run_decoder(embeddings, positions, cached, cache, mask)
        if cached:
            self._cache, self._seen = cache, end
        return hidden

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head, lo, n = self.lm_head, self.image_token_offset, self.image_vocab_size
        if lo == 0 and n == self._lm_vocab_size():
            logits = head(hidden)
        elif isinstance(head, nn.Linear):  # project onto the image rows only
            bias = None if head.bias is None else head.bias[lo: lo + n]
            logits = F.linear(hidden, head.weight[lo: lo + n], bias)
        else:
            logits = head(hidden)[..., lo: lo + n]
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        scale = getattr(self.text_config, "logit_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
            logits = logits * scale
        return logits

    @torch.no_grad()
    def _check_logits_match_the_model(self) -> None:
        """One 2-token forward through the model's own `forward` and through this adapter: an LM whose logits
        are post-processed in a way `head` does not reproduce (Granite divides by `logits_scaling`,
        HyperCLOVA X multiplies by it, ...) is refused instead of being sampled from with wrong logits."""
        if self.image_head is not None or self.image_embedding is not None:
            return  # the model's own forward does not run the separate image parts
        weight = self.embedding_weight
        if weight.device.type == "meta":
            return
        from ..generation import evaluating

        lo, n = self.image_token_offset, self.image_vocab_size
        ids = torch.arange(min(2, n), device=weight.device)[None]
        with evaluating(self.model):
            expected = self.model(input_ids=ids + lo, use_cache=False).logits[..., lo: lo + n].float()
            got = self.head(self.forward_hidden(self.embed_tokens(ids)))
        # logits a model masks out itself (Chameleon suppresses image tokens in its text forward) say nothing
        compared = torch.isfinite(expected) & (expected > torch.finfo(expected.dtype).min / 2)
        if not bool(compared.any()):
            return
        scale = float(expected[compared].abs().max()) or 1.0
        error = float((got - expected)[compared].abs().max()) / scale
        if not error <= 2e-2:  # same ops in the same dtype: only reduction-order rounding is expected
            raise ValueError(f"{type(self.model).__name__}'s own logits differ from head(forward_hidden(...)) by "
                             f"{error:.2g} of their scale: its forward post-processes the LM head's output in a way "
                             f"HFCausalLMAdapter does not reproduce (supported: final_logit_softcapping, "
                             f"logit_scale); pass image_head= with a module that computes the image logits, or "
                             f"check_logits=False if the difference is intended")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        logits = self.image_head(hidden) if self.image_head is not None else self._lm_logits(hidden)
        return logits.float()

    def _new_cache(self, batch_size: int, max_seq_length: int, dtype: torch.dtype):
        """A fresh cache object, or None to let the model create its default (dynamic) cache."""
        if callable(self.cache_kind):
            return self.cache_kind(self.model, batch_size, max_seq_length, dtype)
        if self.cache_kind == "dynamic":
            return None
        transformers = _require_transformers()
        if _version_tuple(transformers.__version__) < STATIC_CACHE_MIN_VERSION:
            raise RuntimeError(f"cache='static' needs transformers >= {'.'.join(map(str, STATIC_CACHE_MIN_VERSION))} "
                               f"(found {transformers.__version__}); use cache='dynamic'")
        config = self.model.config
        attempts = (dict(config=config, max_cache_len=max_seq_length),
                    dict(config=config, max_batch_size=batch_size, max_cache_len=max_seq_length, device=self.device,
                         dtype=dtype))
        for kwargs in attempts:
            try:
                return transformers.StaticCache(**kwargs)
            except TypeError:
                continue
        raise RuntimeError("could not build a transformers StaticCache with this transformers version")

    def setup_caches(self, batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None,
                     cond_mask: torch.Tensor | None = None) -> None:
        if self.max_positions is not None and max_seq_length > self.max_positions:
            raise ValueError(f"{max_seq_length} positions were asked for, but {type(self.model).__name__} has "
                             f"{self.max_positions} positions")
        self._cache_args = (batch_size, max_seq_length, dtype or self.dtype)
        self._cache = self._new_cache(*self._cache_args)
        self._seen = 0
        self._cond_mask = cond_mask

    def clear_caches(self) -> None:
        self._cache = None
        self._cond_mask = None
        self._cache_args = None
        self._seen = 0

    # -- validation --------------------------------------------------------------------------
    def _prompt_vocab_size(self) -> int:
        """How many prompt token ids the input embeddings take (the bound of `cond` and `uncond_ids`)."""
        return self.input_embeddings.num_embeddings if hasattr(self.input_embeddings, "num_embeddings") \
            else self._lm_vocab_size()

    def check_condition(self, cond, batch_size: int | None = None, *, name: str = "cond") -> int:
        super().check_condition(cond, batch_size, name=name)
        if self.condition == "prefix":
            check_id_tensor(cond, name=name, dims=2, layout="prompt token ids [B, L] (an integer tensor)",
                            what="token ids", upper=self._prompt_vocab_size())
            self._lock_length(cond.shape[1], name)
        elif self.condition == "embeds":
            if cond.dim() != 3 or cond.shape[-1] != self.hidden_size or not cond.dtype.is_floating_point:
                raise ValueError(f"{name} must be prompt embeddings [B, L, {self.hidden_size}], got shape "
                                 f"{tuple(cond.shape)} and dtype {cond.dtype}")
            self._lock_length(cond.shape[1], name)
        return cond.shape[0]
