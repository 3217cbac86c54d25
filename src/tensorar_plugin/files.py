"""Files: writing them so that an interrupted run never leaves a half-written one behind, and reading
safetensors and JSON so that a damaged file is a clear error naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "read_json", "read_safetensors", "unreadable_file"]


def unreadable_file(path: str | Path, detail: object) -> ValueError:
    """The error for a file that exists but cannot be parsed (truncated download, wrong file)."""
    return ValueError(f"cannot read {path}: the file is damaged or not what its name says (a download that "
                      f"stopped early, say): {detail}. Download or write it again.")


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, with a truncated or corrupt file reported as a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise unreadable_file(path, exc) from exc


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


def read_json(path: str | Path) -> Any:
    """A JSON file's content, with a truncated or hand-broken file reported as a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unreadable_file(path, exc) from None
