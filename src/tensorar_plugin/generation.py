"""KV-cached sampling loops: TensorAR's refinement loop and the plain next-token sampler it generalises.

One loop serves both. Step 0 runs the condition (prefill) and predicts the first window; each later
step feeds the previously predicted window (first token final, the rest drafts) as ONE new position,
predicts the next window and commits its first token. `T` image tokens take exactly `T` forward
steps and `T` cache positions, as in plain next-token sampling, which is the `window=1` case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm  # plain text bar: tqdm.auto warns in notebooks without ipywidgets

from .adapters import BackboneAdapter, find_adapter
from .adapters.base import NULL_CONDITION_HINT
from .checks import is_integer
from .noise import PAD_ID
from .sampling import check_sampling_args, guided_logits, race_noise, sample_tokens

__all__ = ["GenerationOutput", "WindowRule", "generate_windows", "sample_plain", "check_cond_mask", "evaluating"]

DRAFT_MODES = ("sample", "argmax")
#: decode steps attend to the filled KV cache rounded up to this many positions (adapters with `supports_kv_len`):
#: a 256-token image reads ~60% of the static cache on average, in 4 key lengths (4 CUDA graphs, one compile)
KV_BUCKET = 64
_STEP_IDS = itertools.count()  # names the code of each compiled decode step apart (see `_own_code`)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `module` in eval mode for the block, then give every submodule back its own previous mode
    (`module.train(was_training)` would also flip a deliberately frozen, eval-mode backbone)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield module
    finally:  # parents first, then each child its own mode, through train() so that overrides of it run
        for sub, training in modes:
            if sub.training != training:
                sub.train(training)


class GenerationOutput(NamedTuple):
    """Final tokens `[B, T]` and, per position, its `k` predictions from coarsest draft to final `[B, T, k]`.

    `history[b, t, -1] == tokens[b, t]`; entries never predicted (the first `k - 1` positions are
    predicted fewer than `k` times) hold -1.
    """

    tokens: torch.Tensor
    history: torch.Tensor | None


def _check_num_tokens(num_tokens: int | None, adapter: BackboneAdapter) -> int:
    limit = adapter.max_image_tokens
    if num_tokens is None:
        return limit
    if not is_integer(num_tokens) or not 1 <= num_tokens <= limit:
        raise ValueError(f"num_tokens must be an integer in [1, {limit}] (the most image tokens the model "
                         f"generates), got {num_tokens!r}")
    return int(num_tokens)


@torch.no_grad()
def generate_windows(
    adapter: BackboneAdapter,
    cond: torch.Tensor,
    *,
    window: int,
    embed_window: Callable[[torch.Tensor], torch.Tensor],
    window_logits: Callable[[torch.Tensor], torch.Tensor],
    num_tokens: int | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    draft: str = "sample",
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_history: bool = False,
    progress: bool = False,
    compile: bool | dict[str, Any] = False,
    cond_mask: torch.Tensor | None = None,
) -> GenerationOutput:
    """The sampling loop behind `TensorARWrapper.generate` and `sample_plain`.

    `embed_window` maps windows `[N, S, k]` to input embeddings `[N, S, d]`; `window_logits` maps
    hidden states `[N, d]` to logits `[N, k, V]`. `greedy` applies to the committed (first) token;
    drafts follow `draft`: "sample" draws them with the same temperature/top-k/top-p, "argmax" takes
    the most likely token. Classifier-free guidance runs the condition and its
    null counterpart as one batch and mixes every slot's logits; `cfg_interval=N >= 0` guides only the
    first `N + 2` tokens (the prefill and `N + 1` decode steps, LlamaGen's counting), then uses the
    conditional logits alone. `compile=True` (or a dict of
    `torch.compile` options) compiles the cached decode step (embedding, backbone, heads) without graph
    breaks; on CUDA the default mode is "reduce-overhead" (CUDA graphs). `cond_mask` `[B, n_cond]`
    (1 = real token) hides padded condition positions, like LlamaGen's `emb_masks` for text.
    """
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, greedy=greedy)
    temperature, top_k, top_p, cfg_scale = float(temperature), int(top_k), float(top_p), float(cfg_scale)
    greedy = bool(greedy)
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {DRAFT_MODES}, got {draft!r}")
    for name, value in (("use_cache", use_cache), ("return_history", return_history), ("progress", progress)):
        if not isinstance(value, (bool, np.bool_)):  # a truthy "no" or None would silently pick a path
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not isinstance(compile, (bool, np.bool_, dict)):
        raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    use_cache, return_history, progress = bool(use_cache), bool(return_history), bool(progress)
    compile = compile if isinstance(compile, dict) else bool(compile)
    if not is_integer(cfg_interval) or cfg_interval < -1:
        raise ValueError(f"cfg_interval must be an integer >= -1 (-1 keeps guidance on), got {cfg_interval!r}")
    cfg_interval = int(cfg_interval)
    batch = adapter.check_condition(cond)  # first: it fixes the prompt length that bounds the image length
    cond = cond.to(adapter.device)  # labels made on the CPU for a model on the GPU (no copy when already there)
    if generator is not None and generator.device.type != adapter.device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {adapter.device}: make it with "
                         f"torch.Generator(device={str(adapter.device)!r})")
    total = _check_num_tokens(num_tokens, adapter)
    guided = cfg_scale != 1.0
    if guided and not adapter.has_null_condition:
        raise ValueError(f"cfg_scale != 1 needs a null condition, but this model has none ({NULL_CONDITION_HINT})")
    cond_all = torch.cat([cond, adapter.null_condition(cond)]) if guided else cond
    mask_kwargs = {}
    if cond_mask is not None:
        mask_kwargs["cond_mask"] = check_cond_mask(cond_mask, adapter, batch, guided)
    rows, n_cond, k, device = cond_all.shape[0], adapter.num_cond_tokens, window, adapter.device

    rule = WindowRule(guided=guided, mix=guided, greedy=greedy, draft=draft, top_k=top_k, nucleus=top_p < 1)
    knobs = torch.tensor([cfg_scale, temperature, top_p], dtype=torch.float32, device=device)
    unmixed = dataclasses.replace(rule, mix=False)  # after cfg_interval: conditional logits alone
    noise_shape = rule.noise_shape(batch, k, adapter.vocab_size)
    positions = torch.arange(n_cond, n_cond + total, device=device)
    slots = torch.arange(k, device=device)
    tokens = torch.empty(batch, total, dtype=torch.long, device=device)
    history = torch.full((batch, total + k - 1, k), -1, dtype=torch.long, device=device) if return_history else None
    fed = None if use_cache else torch.full((rows, total, k), PAD_ID, dtype=torch.long, device=device)

    bounded = use_cache and adapter.supports_kv_len
    key_limit = _round_up(n_cond + total, 8)  # the most keys a step reads
    if use_cache:  # bounded reads: the cache is 8 slots longer than any read, so every read is a strict
        # prefix of it (a read of the whole cache would be specialised apart by the compiler)
        adapter.setup_caches(rows, key_limit + 8 if bounded else n_cond + total, **mask_kwargs)
    decode_steps, key_spans = {}, {}  # per rule / per key length, made on first use
    cond_emb = adapter.embed_condition(cond_all, train=False)
    current = None
    for step in tqdm(range(total), disable=not progress, desc="sampling", unit="tok", leave=False):
        noise = None if noise_shape is None else race_noise(noise_shape, device, generator)
        step_rule = rule if cfg_interval < 0 or step - 1 <= cfg_interval else unmixed
        if step == 0:  # prefill (a cached run keeps the condition mask in the cache's causal mask)
            pos = torch.arange(n_cond, device=device) if use_cache else None
            hidden = adapter.forward_hidden(cond_emb, pos, **({} if use_cache else mask_kwargs))[:, -1]
            current = step_rule.pick(window_logits(hidden), noise, knobs)
        elif use_cache:  # one call: guidance batch, backbone, heads, guidance mix and sampling
            if step_rule not in decode_steps:
                decode_steps[step_rule] = _decode_step(adapter, embed_window, window_logits, step_rule, compile,
                                                       batch)
            keys = None
            if bounded:  # one span per key length, made once
                kv_len = min(_round_up(n_cond + step, KV_BUCKET), key_limit)
                if kv_len not in key_spans:
                    key_spans[kv_len] = _key_span(kv_len, device)
                keys = key_spans[kv_len]
            current = decode_steps[step_rule](current, positions[step - 1: step], noise, knobs, keys)
        else:
            fed[:, step - 1] = torch.cat([current, current]) if guided else current
            sequence = torch.cat([cond_emb, embed_window(fed[:, :step])], dim=1)
            hidden = adapter.forward_hidden(sequence, **mask_kwargs)[:, -1]
            current = step_rule.pick(window_logits(hidden), noise, knobs)
        if k > 1 and step + k > total:  # slots past the last image token are padding
            current = current.masked_fill(step + slots >= total, PAD_ID)
        tokens[:, step] = current[:, 0]
        if history is not None:
            history[:, step + slots, k - 1 - slots] = current
    return GenerationOutput(tokens, None if history is None else history[:, :total])


@dataclasses.dataclass(frozen=True)
class WindowRule:
    """How one step turns window logits into the next window: guidance mix, then sampling per slot.

    Holds only what changes the computation's structure; the values (cfg scale, temperature, top-p)
    come in as a float32 tensor `knobs`, so a compiled step serves every value without recompiling.
    `guided`: the logits hold the conditional rows then the null rows; `mix`: apply the cfg scale
    (otherwise the conditional rows are used alone). Pure given its race noise, so the same rule
    runs eagerly, compiled, or inside a CUDA graph and picks the same tokens.
    """

    guided: bool
    mix: bool
    greedy: bool
    draft: str
    top_k: int
    nucleus: bool

    def noise_shape(self, batch: int, k: int, vocab: int) -> tuple[int, int, int] | None:
        """Shape of the race noise one step consumes (None when every slot is an argmax)."""
        if self.greedy:
            return (batch, k - 1, vocab) if self.draft == "sample" and k > 1 else None
        return (batch, k if self.draft == "sample" else 1, vocab)

    def pick(self, logits: torch.Tensor, noise: torch.Tensor | None, knobs: torch.Tensor) -> torch.Tensor:
        """Window logits `[rows, k, V]` -> token ids `[batch, k]`; `knobs` = (cfg_scale, temperature, top_p)."""
        if self.guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = guided_logits(cond_logits, uncond_logits, knobs[0]) if self.mix else cond_logits
        options = dict(temperature=knobs[1], top_k=self.top_k, top_p=knobs[2] if self.nucleus else 1.0)
        if self.draft == "sample" and not self.greedy:  # one draw for the whole window
            return sample_tokens(logits, noise=noise, **options)
        final = (logits[:, :1].argmax(dim=-1) if self.greedy
                 else sample_tokens(logits[:, :1], noise=noise, **options))
        if logits.shape[1] == 1:
            return final
        drafts = (logits[:, 1:].argmax(dim=-1) if self.draft == "argmax"
                  else sample_tokens(logits[:, 1:], noise=noise, **options))
        return torch.cat([final, drafts], dim=1)


def check_cond_mask(cond_mask: torch.Tensor, adapter: BackboneAdapter, batch: int, guided: bool,
                    check_values: bool = True) -> torch.Tensor:
    """Validate a `[B, n_cond]` condition mask; boolean, duplicated for the null half under guidance.

    A longer mask `[B, L > n_cond]` is cut to its first `n_cond` columns where the adapter cuts its
    conditions so (`cuts_long_conditions`: LlamaGen keeps the first `cls_token_num` caption tokens).
    `check_values=False` skips the 0/1 check, the one part that reads the mask back from the device."""
    if not adapter.condition_mask_supported():
        raise ValueError(f"cond_mask is not supported by {type(adapter).__name__}")
    n_cond = adapter.num_cond_tokens
    shape = tuple(getattr(cond_mask, "shape", ()))
    longer_ok = adapter.cuts_long_conditions
    if (not isinstance(cond_mask, torch.Tensor) or len(shape) != 2 or shape[0] != batch or shape[1] < n_cond
            or (shape[1] > n_cond and not longer_ok)):
        raise ValueError(f"cond_mask must have shape ({batch}, {n_cond}) (batch, condition tokens"
                         f"{'; longer masks are cut like the features' if longer_ok else ''}), got {shape}")
    cond_mask = cond_mask[:, :n_cond]
    if check_values and cond_mask.dtype != torch.bool and not bool(((cond_mask == 0) | (cond_mask == 1)).all()):
        raise ValueError("cond_mask must hold only 1 (real token) and 0 (padding)")
    cond_mask = cond_mask.to(adapter.device).bool()
    return torch.cat([cond_mask, cond_mask]) if guided else cond_mask


def _decode_step(adapter: BackboneAdapter, embed_window, window_logits, rule: WindowRule,
                 compile: bool | dict[str, Any], batch: int):
    """The whole cached decode step, `(window [B, k], position [1], race noise, knobs, key span) -> next window`.

    It duplicates the window for the null condition, runs embedding, backbone and heads, mixes the
    guidance and samples, so a compiled step (`fullgraph=True`; CUDA graphs by default on CUDA)
    leaves the Python loop nothing but drawing the noise and storing the committed token.
    """

    def step(windows: torch.Tensor, input_pos: torch.Tensor, noise: torch.Tensor | None,
             knobs: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        fed = torch.cat([windows, windows]) if rule.guided else windows
        bounded = {} if keys is None else {"kv_len": keys.shape[1]}
        hidden = adapter.forward_hidden(embed_window(fed[:, None]), input_pos, **bounded)[:, -1]
        return rule.pick(window_logits(hidden), noise, knobs)

    if not compile:
        return step
    if not adapter.decode_step_compiles:
        raise ValueError(f"compile=True: {type(adapter).__name__}'s decode step reads values back to the host, "
                         f"so it cannot be captured as one graph; sample with compile=False")
    options = dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("fullgraph", True)
    if adapter.device.type == "cuda" and "backend" not in options:
        options.setdefault("mode", "reduce-overhead")
    # One compiled step per owner of the heads (the wrapper, or the adapter for plain sampling), per
    # rule, batch size and options, kept on that owner: recompiling on every call would dominate the
    # runtime, and a step that has seen two batch sizes would be recompiled with a symbolic batch
    # (generic kernels, measurably slower); only the key length is left dynamic.
    # The functions are part of the key (bound methods compare equal when their object and function do):
    # a step compiled around one pair must never serve another.
    owner = getattr(embed_window, "__self__", adapter)
    cache = owner.__dict__.setdefault("_compiled_decode_steps", CompiledSteps())
    key = (rule, batch, _hashable(options), embed_window, window_logits)
    if key not in cache:
        cache[key] = _fresh_outputs(torch.compile(_own_code(step), **options))
    return cache[key]


def _hashable(value: Any) -> Any:
    """`value` as a hashable key: dicts (torch.compile's own `options`, say) and lists become sorted tuples."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _key_span(kv_len: int, device: torch.device) -> torch.Tensor:
    """An empty `[0, kv_len]` tensor that hands the number of keys to read to the decode step as a size
    marked dynamic: a compiled step traces one graph for every key length (a Python int would be
    specialised on its first value and recompiled on the second), and there is no data to copy."""
    keys = torch.empty(0, kv_len, device=device)
    torch._dynamo.maybe_mark_dynamic(keys, 1)
    return keys


class CompiledSteps(dict):
    """Compiled decode steps of one owner. Copies and pickles start empty: a compiled step closes over
    the model it was traced from, so a deep copy (an EMA model, say) must compile its own."""

    def __reduce__(self):
        return (type(self), ())


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object, and a name, of its own. Dynamo caps recompilations per code object (8 by
    default; past it, a hard error under `fullgraph=True`, eager code otherwise), and it remembers the
    shapes a function has seen by file, line and name: a second batch size would make the next step's
    batch symbolic. Each compiled step (one per model, rule and batch size) starts afresh."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_STEP_IDS)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _fresh_outputs(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark each call a new CUDA-graph step and copy its output out of the graph's memory, which the
    next replay overwrites (the window is fed back as the next step's input)."""
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

    def call(*args):
        if mark_step is not None:
            mark_step()
        return compiled(*args).clone()

    return call


def _plain_adapter(model) -> BackboneAdapter:
    """The adapter `sample_plain` uses for `model`, kept on the model so its KV caches and compiled
    decode steps live as long as the model instead of being rebuilt on every call."""
    if isinstance(model, BackboneAdapter):
        return model
    adapter = model.__dict__.get("_tensorar_plain_adapter")
    if adapter is None:
        adapter = model.__dict__["_tensorar_plain_adapter"] = find_adapter(model)
    return adapter


def sample_plain(model, cond: torch.Tensor, num_tokens: int | None = None, *, cfg_scale: float = 1.0,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, generator: torch.Generator | None = None, use_cache: bool = True,
                 progress: bool = False, compile: bool | dict[str, Any] = False,
                 cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain next-token sampling of `model` (LlamaGen `generate()` semantics); image tokens `[B, T]`.

    `model` is any model an adapter accepts (or a `BackboneAdapter`). Guidance, temperature, top-k
    and top-p follow LlamaGen; `cfg_scale == 1` runs no null batch. Unlike LlamaGen, which ignores
    scales up to 1, every `cfg_scale != 1` is applied (`0` samples unconditionally).
    """
    adapter = _plain_adapter(model)
    with evaluating(adapter.model):
        return generate_windows(
            adapter, cond, window=1,
            embed_window=adapter.plain_embed_window, window_logits=adapter.plain_window_logits,
            num_tokens=num_tokens, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
            top_k=top_k, top_p=top_p, greedy=greedy, generator=generator, use_cache=use_cache,
            progress=progress, compile=compile, cond_mask=cond_mask,
        ).tokens
