"""Type checks that arguments across the package share, so that every function accepts the same values."""

from __future__ import annotations

import numbers

__all__ = ["is_integer"]


def is_integer(value: object) -> bool:
    """An integer, Python's or NumPy's (a size read off an array, say), but not a bool: `True` is no count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
