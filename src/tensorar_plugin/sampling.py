"""Token sampling from logits: temperature, top-k, top-p and greedy, without host synchronisation.

Sampling uses the exponential race (`argmax(p / E)`, `E ~ Exp(1)`), which draws exactly from the
categorical distribution `p`, vectorises over any leading shape, honours a `torch.Generator`, and,
unlike `torch.multinomial`, never waits on the GPU. The race noise can be drawn ahead
(`race_noise`) and passed in, so a compiled or CUDA-graphed step samples exactly what the eager
step samples from the same generator.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .checks import is_integer

__all__ = ["check_sampling_args", "filter_logits", "sample_tokens", "guided_logits", "race_noise"]


#: below this temperature `logits / temperature` can overflow float32 (|logits| up to 3e8); greedy is meant
MIN_TEMPERATURE = 1e-30
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _real(value) -> float | None:
    """`value` as a float if it is a real number (numpy scalars included, bools not) finite in float32."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and abs(value) <= _FLOAT32_MAX else None


def check_sampling_args(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        cfg_scale: float = 1.0, greedy: bool = False) -> None:
    """Raise `ValueError` naming the argument for values outside their ranges.

    Sampling values are carried to the device as float32, so they must be finite there; a temperature
    below `MIN_TEMPERATURE` would overflow the scaled logits (use `greedy=True` for argmax decoding).
    """
    value = _real(temperature)
    if value is None or value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (argmax decoding is greedy "
                         f"sampling), got {temperature!r}")
    if not (is_integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    value = _real(top_p)
    if value is None or not 0 < value <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    value = _real(cfg_scale)
    if value is None or value < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if not isinstance(greedy, (bool, np.bool_)):
        raise ValueError(f"greedy must be True or False, got {greedy!r}")


def guided_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as LlamaGen applies it: `uncond + scale * (cond - uncond)`."""
    return uncond_logits + (cond_logits - uncond_logits) * cfg_scale


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest nucleus of mass `top_p`; the rest become -inf.

    `top_p` may be a 0-dim tensor (a compiled step's input); the nucleus is then always applied.
    """
    if top_k > 0:
        top_k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        remove_sorted = mass_before > top_p  # as LlamaGen: the token that crosses top_p is kept
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def race_noise(shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Exp(1) noise, float32, for `sample_tokens(..., noise=)`; the same draws `sample_tokens` makes itself."""
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)


def sample_tokens(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                  top_p: float | torch.Tensor = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token id per row of `logits` `[..., V]` -> `[...]` (int64).

    `noise` (from `race_noise`, shaped like `logits`) replaces the draw from `generator`;
    `temperature` and `top_p` may be 0-dim float32 tensors (same result as the Python floats).
    """
    if greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    if noise is None:
        noise = race_noise(probs.shape, probs.device, generator)
    return (probs / noise).argmax(dim=-1)
