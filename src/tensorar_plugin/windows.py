"""Sliding windows over image-token sequences: the inputs and targets of next-tensor prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .noise import PAD_ID

__all__ = ["IGNORE_INDEX", "input_windows", "target_windows"]

#: Target id that carries no loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


def _windows(tokens: torch.Tensor, window: int, fill: int) -> torch.Tensor:
    """`[B, T]` -> `[B, T, window]` with `out[b, t, j] = tokens[b, t + j]`, or `fill` past the end."""
    return F.pad(tokens, (0, window - 1), value=fill).unfold(1, window, 1)


def input_windows(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Input window of every image position but the last: `[B, T - 1, window]`, `PAD_ID` past the end.

    Window `t` is `[x_t, x_{t+1}, ..., x_{t+k-1}]`; it is fed at image position `t`, whose hidden state
    predicts the next window.
    """
    return _windows(tokens, window, PAD_ID)[:, :-1]


def target_windows(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Clean target window of every output position: `[B, T, window]`, `IGNORE_INDEX` past the end.

    Output position 0 is the last condition token; output position `t` predicts `x_t, ..., x_{t+k-1}`.
    """
    return _windows(tokens, window, IGNORE_INDEX)
