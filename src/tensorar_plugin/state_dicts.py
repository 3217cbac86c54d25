"""Comparing a checkpoint's tensors with what a model expects, for error messages that say what is wrong."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["describe_mismatch", "first_items"]


def first_items(items: list[str], n: int = 5) -> str:
    """The first `n` items, comma-separated, with a count of the rest."""
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """Missing / unexpected keys and shape mismatches of `found` against `expected`, or None if they fit."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key}: checkpoint {tuple(found[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items() if key in found and tuple(found[key].shape) != tuple(value.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {first_items(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {first_items(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {first_items(shapes, 3)}")
    return "; ".join(parts) or None
