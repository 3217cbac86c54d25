"""Discrete tensor noising: corrupt the draft slots of input windows with random codebook indices.

TensorAR feeds each step a window `[x_t, x*_{t+1}, ..., x*_{t+k-1}]`: the first token is final, the
others are drafts. During training the drafts are simulated by replacing slot `j` with a uniform
random codebook index with probability `beta(j)`, so the model cannot copy its targets from the
input (the paper's "information leakage"). `beta` rises from 0 (slot 0, never noised) to
`max_noise` (last slot) along a schedule evaluated at `u_j = j / (k - 1)`.

`TensorARWrapper(noise_schedule="adaptive")` (our extension, see docs/tensorar.md) instead sets
`beta(j) = max_noise * (1 - a_j)` from a running estimate `a_j` of how often the model's own slot-`j` prediction
is right, so training drafts are exactly as reliable as the drafts generation will feed back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .checks import is_integer

__all__ = ["SCHEDULES", "ADAPTIVE", "EXPONENTIAL_RATE", "PAD_ID", "noise_schedule", "discrete_tensor_noise",
           "clean_first_slot", "replace_slots"]

#: Name of the schedule that follows the model's own draft accuracy (handled by `TensorARWrapper`).
ADAPTIVE = "adaptive"

#: Id used for window slots past the last image position; never noised, never a target.
PAD_ID = -1

#: Curvature of the exponential schedule, `(exp(a u) - 1) / (exp(a) - 1)`. The paper does not
#: publish its closed form; a = 3 keeps early drafts nearly clean and the last slot fully noised.
EXPONENTIAL_RATE = 3.0

Schedule = str | Callable[[torch.Tensor], torch.Tensor]


def _exponential(u: torch.Tensor) -> torch.Tensor:
    return torch.expm1(EXPONENTIAL_RATE * u) / math.expm1(EXPONENTIAL_RATE)


SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda u: u,
    "sine": lambda u: torch.sin(0.5 * math.pi * u),
    "sqrt": torch.sqrt,
    "exponential": _exponential,
}


def noise_schedule(window: int, schedule: Schedule = "exponential", *, max_noise: float = 1.0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Replacement probability `beta(j)` for each slot `j` of a window of size `window` (float32 `[window]`).

    `schedule` is a name from `SCHEDULES` or a callable mapping `u` in [0, 1] to [0, 1]; the result is
    scaled by `max_noise` and slot 0 is forced to 0.
    """
    if not is_integer(window) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    window = int(window)
    if not 0.0 <= max_noise <= 1.0:
        raise ValueError(f"max_noise must be in [0, 1], got {max_noise!r}")
    if isinstance(schedule, str):
        if schedule == ADAPTIVE:
            raise ValueError("the 'adaptive' schedule depends on the model's draft accuracy: use "
                             "TensorARWrapper(noise_schedule='adaptive'), or pass beta= to discrete_tensor_noise")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} "
                             "or pass a callable")
        fn = SCHEDULES[schedule]
    elif callable(schedule):
        fn = schedule
    else:
        raise ValueError(f"schedule must be a name or a callable, got {type(schedule).__name__}")
    if window == 1:
        return torch.zeros(1, device=device)
    u = torch.arange(window, dtype=torch.float32, device=device) / (window - 1)
    beta = torch.as_tensor(fn(u), dtype=torch.float32, device=device)
    if beta.shape != u.shape or not torch.isfinite(beta).all() or (beta < 0).any() or (beta > 1).any():
        raise ValueError("schedule must map u in [0, 1] to values in [0, 1] elementwise")
    beta = beta * max_noise
    beta[0] = 0.0
    return beta


def discrete_tensor_noise(windows: torch.Tensor, codebook_size: int, schedule: Schedule = "exponential", *,
                          max_noise: float = 1.0, generator: torch.Generator | None = None,
                          return_mask: bool = False, beta: torch.Tensor | None = None):
    """Replace slot `j` of each window (last dim) by a uniform codebook index with probability `beta(j)`.

    `windows` is an integer tensor `[..., k]`; entries equal to `PAD_ID` (negative) are padding and
    stay as they are. A replacement is drawn uniformly over the whole codebook, so it can equal the
    clean token (the paper's `q(x* | x) = (1 - beta) onehot(x) + beta / V`). With `return_mask` the
    boolean mask of replaced slots is returned too. `beta` (`[k]`, values in [0, 1]) replaces the
    schedule; slot 0 is still never noised.
    """
    if windows.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"windows must be an integer tensor of token ids, got dtype {windows.dtype}")
    if windows.dim() < 1:
        raise ValueError("windows must have a last dimension of size k")
    if not is_integer(codebook_size) or codebook_size < 1:
        raise ValueError(f"codebook_size must be an integer >= 1, got {codebook_size!r}")
    codebook_size = int(codebook_size)
    if beta is None:
        beta = noise_schedule(windows.shape[-1], schedule, max_noise=max_noise, device=windows.device)
    else:
        beta = torch.as_tensor(beta, dtype=torch.float32)
        if beta.shape != windows.shape[-1:] or not bool(((beta >= 0) & (beta <= 1)).all()):  # NaN fails too
            raise ValueError(f"beta must hold {windows.shape[-1]} probabilities in [0, 1], got {beta}")
        beta = clean_first_slot(beta).to(windows.device, torch.float32)
    noised, replace = replace_slots(windows, beta, codebook_size, generator)
    return (noised, replace) if return_mask else noised


def clean_first_slot(beta: torch.Tensor) -> torch.Tensor:
    """`beta` `[k]` with slot 0 set to 0, out of place (autograd- and graph-friendly): the first token of a
    window is final and never noised."""
    return torch.cat([torch.zeros_like(beta[:1]), beta[1:]])


def replace_slots(windows: torch.Tensor, beta: torch.Tensor, codebook_size: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw behind `discrete_tensor_noise`, without its checks: `beta` `[k]` must already hold valid
    probabilities (0 for slot 0). Returns the noised windows and the mask of replaced slots. Nothing is
    read back from the device, so a training step that calls it never waits for the GPU."""
    draws = torch.rand(windows.shape, generator=generator, device=windows.device)
    replace = (draws < beta) & (windows >= 0)
    random_ids = torch.randint(0, codebook_size, windows.shape, generator=generator, device=windows.device,
                               dtype=windows.dtype)
    return torch.where(replace, random_ids, windows), replace
