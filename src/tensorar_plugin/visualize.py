"""Image-grid helpers: decode image tokens through a VQ decoder and lay the results out as PIL images.

`vq` is anything with `decode_code(codes [B, h*w]) -> images [B, 3, H, W] in [-1, 1]` (a
`tensorar_plugin.models.vq.VQModel`, or the demo's `PatchTokenizer`).

    images = tokens_to_images(vq, tokens, grid=8)          # list of PIL images
    image_grid(images, nrow=8).save("samples.png")
    render_history(vq, out.history, out.tokens, grid=8).save("history.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["decode_tokens", "tokens_to_images", "image_grid", "render_history", "history_to_tokens"]


def _grid_shape(grid, num_tokens: int) -> tuple[int, int]:
    if grid is None:
        side = int(round(num_tokens ** 0.5))
        grid = (side, side)
    elif isinstance(grid, int):
        grid = (grid, grid)
    h, w = int(grid[0]), int(grid[1])
    if h * w != num_tokens:
        raise ValueError(f"a {h}x{w} token grid needs {h * w} tokens per image, got {num_tokens}")
    return h, w


@torch.no_grad()
def decode_tokens(vq, tokens: torch.Tensor, grid: int | Sequence[int] | None = None) -> torch.Tensor:
    """Decode image tokens `[B, h*w]` (row-major) through `vq` into images `[B, 3, H, W]` in about [-1, 1].

    The tokens go to the device of `vq`'s weights; `grid` is the token grid (`h` for a square one, or
    `(h, w)`); None infers a square grid.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a [batch, h*w] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    h, w = _grid_shape(grid, tokens.shape[1])
    params = next(iter(vq.parameters()), None) if hasattr(vq, "parameters") else None
    buffers = next(iter(vq.buffers()), None) if hasattr(vq, "buffers") else None
    ref = params if params is not None else buffers
    codes = tokens.to(device=ref.device if ref is not None else tokens.device, dtype=torch.long)
    dim = getattr(getattr(vq, "config", None), "codebook_embed_dim", None)
    if isinstance(dim, int):  # a VQModel: pass the grid shape explicitly (non-square grids work)
        return vq.decode_code(codes, shape=(codes.shape[0], dim, h, w))
    return vq.decode_code(codes)


@torch.no_grad()
def tokens_to_images(vq, tokens: torch.Tensor, grid: int | Sequence[int] | None = None, *,
                     batch_size: int = 64) -> list:
    """Decode image tokens `[B, h*w]` (row-major) through `vq` into a list of `B` RGB PIL images.

    `grid` is the token grid (`h` for a square one, or `(h, w)`); None infers a square grid.
    """
    from PIL import Image

    from .models.vq import tensor_to_uint8

    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a [batch, h*w] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    images = []
    for chunk in tokens.split(batch_size):
        decoded = decode_tokens(vq, chunk, grid)
        images.extend(Image.fromarray(a) for a in tensor_to_uint8(decoded.float().clamp(-1, 1)))
    return images


def image_grid(images: Sequence, nrow: int, *, padding: int = 2, scale: int = 1, background=(0, 0, 0)):
    """Paste equally sized PIL images into one picture, `nrow` images per row (like torchvision).

    The result is `cols * (W * scale + padding) + padding` wide and `rows * (H * scale + padding) +
    padding` high, where `cols = min(nrow, len(images))`.
    """
    from PIL import Image

    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"nrow and scale must be >= 1 and padding >= 0, got {nrow}, {scale}, {padding}")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("image_grid needs images of one size")
    w, h = w * scale, h * scale
    cols = min(nrow, len(images))
    rows = (len(images) + nrow - 1) // nrow
    canvas = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding), background)
    for i, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        r, c = divmod(i, nrow)
        canvas.paste(im.convert("RGB"), (padding + c * (w + padding), padding + r * (h + padding)))
    return canvas


def history_to_tokens(history: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`[B, T, k]` history -> `[B, k, T]` token maps, slot `m` of every position (-1 -> final token)."""
    if history.ndim != 3 or tokens.shape != history.shape[:2]:
        raise ValueError(f"history must be [B, T, k] matching tokens [B, T], got {tuple(history.shape)} and "
                         f"{tuple(tokens.shape)}")
    filled = torch.where(history < 0, tokens[..., None].to(history.dtype), history)
    return filled.permute(0, 2, 1)


def render_history(vq, history: torch.Tensor, tokens: torch.Tensor, grid: int | Sequence[int] | None = None, *,
                   max_samples: int | None = 8, padding: int = 2, scale: int = 1):
    """Picture of TensorAR's refinement: one row per sample, `k` columns from the coarsest draft to final.

    Column `m` is the image decoded from slot `m` of every position's history (the `m`-th of its `k`
    predictions; where a position has no such prediction, -1 in `history`, its final token is used).
    The last column therefore shows the final sample.
    """
    if max_samples is not None:
        history, tokens = history[:max_samples], tokens[:max_samples]
    maps = history_to_tokens(history.cpu(), tokens.cpu())  # [B, k, T]
    b, k, t = maps.shape
    images = tokens_to_images(vq, maps.reshape(b * k, t), grid)
    return image_grid(images, nrow=k, padding=padding, scale=scale)
