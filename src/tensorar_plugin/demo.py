"""The bundled demo model: a tiny class-conditional MNIST TensorAR model that works fully offline.

    from tensorar_plugin.demo import load_demo
    demo = load_demo()
    tokens = demo.wrapper.generate(torch.arange(10), **demo.info["sampling_kwargs"])
    images = demo.vq.decode_code(tokens)          # [10, 3, 32, 32] in [-1, 1]

The weights live in `tensorar_plugin/assets/demo/` (fp16 safetensors + JSON configs, a few hundred
KB) and are reproduced from a seed by `examples/train_demo.py`. The tokenizer is a k-means *patch
tokenizer* (`PatchTokenizer`: each 4x4 patch of the 32x32 image is replaced by the nearest of 256
learned patches), not a trained `VQModel`: on the 2-core CPU budget the demo must be trained on,
a convolutional VQ autoencoder step was ~100x slower than the whole k-means fit (see docs/demo.md).
`PatchTokenizer` has the `encode_to_codes` / `decode_code` surface of `VQModel`, so every helper
that decodes tokens (`tensorar_plugin.visualize`) accepts either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchTokenizer", "DemoBundle", "load_demo", "demo_path", "DEMO_DIR_NAME"]

DEMO_DIR_NAME = "demo"


class PatchTokenizer(nn.Module):
    """k-means tokenizer of non-overlapping `patch x patch` grayscale patches (a "palette" of patches).

    `encode_to_codes(images [B, 3, H, W] in [-1, 1]) -> [B, (H/patch) * (W/patch)]` (row-major) and
    `decode_code(codes) -> [B, 3, H, W]` mirror `VQModel`; images are averaged to one channel and
    decoded back as three equal channels.
    """

    def __init__(self, codebook_size: int = 256, patch: int = 4, image_size: int = 32):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
        self.codebook_size, self.patch, self.image_size = codebook_size, patch, image_size
        self.register_buffer("codebook", torch.zeros(codebook_size, patch * patch))

    @property
    def downsample_factor(self) -> int:
        return self.patch

    @property
    def config(self) -> dict[str, int]:
        return {"codebook_size": self.codebook_size, "patch": self.patch, "image_size": self.image_size}

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[2] % self.patch or images.shape[3] % self.patch:
            raise ValueError(f"image height and width must be multiples of {self.patch}")
        gray = images.float().mean(dim=1, keepdim=True)
        return F.unfold(gray, self.patch, stride=self.patch).transpose(1, 2)  # [B, L, p*p]

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, h*w]` of images `[B, 3, H, W]` in [-1, 1]."""
        patches = self._patches(images.to(self.codebook.device))
        book = self.codebook.float()
        dist = patches.pow(2).sum(-1, keepdim=True) - 2 * patches @ book.t() + book.pow(2).sum(-1)
        return dist.argmin(dim=-1)

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Images `[B, 3, H, W]` in [-1, 1] from token ids `[B, h*w]` (a square grid); `shape` is ignored."""
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor [B, h*w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        side = int(round(codes.shape[1] ** 0.5))
        if side * side != codes.shape[1]:
            raise ValueError(f"codes must form a square grid, got {codes.shape[1]} per image")
        patches = self.codebook[codes.to(self.codebook.device)].transpose(1, 2)  # [B, p*p, L]
        size = side * self.patch
        gray = F.fold(patches, (size, size), self.patch, stride=self.patch)
        return gray.expand(-1, 3, -1, -1).contiguous()

    @torch.no_grad()
    def fit(self, images: torch.Tensor, *, iters: int = 25, seed: int = 0, max_patches: int = 200_000,
            batch: int = 50_000) -> PatchTokenizer:
        """Lloyd k-means on the patches of `images`; empty clusters are re-seeded from random patches."""
        gen = torch.Generator().manual_seed(seed)
        patches = self._patches(images).reshape(-1, self.patch * self.patch)
        if len(patches) > max_patches:
            patches = patches[torch.randperm(len(patches), generator=gen)[:max_patches]]
        book = patches[torch.randperm(len(patches), generator=gen)[: self.codebook_size]].clone()
        for _ in range(iters):
            assign = torch.cat([
                (chunk.pow(2).sum(-1, keepdim=True) - 2 * chunk @ book.t() + book.pow(2).sum(-1)).argmin(-1)
                for chunk in patches.split(batch)])
            sums = torch.zeros_like(book).index_add_(0, assign, patches)
            counts = torch.bincount(assign, minlength=self.codebook_size).float()
            empty = counts == 0
            book = sums / counts.clamp_min(1)[:, None]
            if empty.any():
                book[empty] = patches[torch.randint(0, len(patches), (int(empty.sum()),), generator=gen)]
        # order the codebook by brightness so ids are stable and readable
        book = book[book.mean(-1).argsort()]
        self.codebook.copy_(book)
        return self


@dataclass
class DemoBundle:
    """The demo's TensorAR model (`wrapper`, eval mode), its tokenizer (`vq`) and `info`.

    `info` holds "class_names", "image_size", "grid" (tokens per side), "window", "sampling"
    (recommended settings) and "sampling_kwargs" (the same, ready for `wrapper.generate`), plus the
    training record written by `examples/train_demo.py`.
    """

    wrapper: Any
    vq: PatchTokenizer
    info: dict[str, Any] = field(default_factory=dict)


def demo_path() -> Path:
    """Folder of the bundled demo assets (inside the installed package)."""
    return Path(str(resources.files("tensorar_plugin") / "assets" / DEMO_DIR_NAME))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_tokenizer(directory: str | Path) -> PatchTokenizer:
    from safetensors.torch import load_file

    directory = Path(directory)
    tok = PatchTokenizer(**_read_json(directory / "tokenizer_config.json"))
    state = load_file(str(directory / "tokenizer.safetensors"))
    tok.codebook.copy_(state["codebook"].float())
    return tok.eval()


def load_demo(device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              directory: str | Path | None = None) -> DemoBundle:
    """Load the bundled demo (offline): `DemoBundle(wrapper, vq, info)`.

    `device` defaults to CPU and `dtype` to float32 (the weights are stored in fp16); `directory`
    loads a bundle written by `examples/train_demo.py --out DIR` instead of the packaged one.
    """
    from .models.llamagen import LlamaGen, LlamaGenConfig
    from .wrapper import TensorARWrapper

    root = Path(directory) if directory is not None else demo_path()
    if not (root / "demo_info.json").is_file():
        raise FileNotFoundError(f"no demo bundle in {root} (demo_info.json missing); "
                                f"run examples/train_demo.py --out {root}")
    info = _read_json(root / "demo_info.json")
    info["sampling_kwargs"] = {k: v for k, v in info["sampling"].items()
                               if k in ("cfg_scale", "temperature", "top_k", "top_p", "draft")}
    config = LlamaGenConfig.from_dict(_read_json(root / "llamagen_config.json"))
    base = LlamaGen(config)
    wrapper = TensorARWrapper.from_pretrained(root / "tensorar", base)
    wrapper = wrapper.to(device=device or "cpu", dtype=dtype or torch.float32).eval()
    vq = load_tokenizer(root).to(device or "cpu")
    return DemoBundle(wrapper=wrapper, vq=vq, info=info)
