"""Writing files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A hidden temporary path beside `target` (same suffix), renamed onto it when the block succeeds: a file
    that exists is complete, so resumable jobs can trust every file they find."""
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind, not even the hidden partial file
        raise
    tmp.replace(target)
