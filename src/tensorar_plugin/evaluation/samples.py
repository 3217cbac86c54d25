"""Sample many images for an FID evaluation: PNG folder, resumable, split over processes, packed as `.npz`.

The `.npz` follows OpenAI's ADM evaluator (guided-diffusion `evaluations/evaluator.py`, which LlamaGen
and the TensorAR paper use): `arr_0` uint8 `[N, H, W, 3]`, plus `arr_1` int64 `[N]`, the class labels.

Reproducibility: sample `i` has class `i % num_classes` (`labels="balanced"`, 50 per class for 50k on
ImageNet) or a seeded uniform draw (`labels="random"`, LlamaGen's `sample_c2i_ddp.py`). Batch `b` holds
samples `b * batch_size ...` and is drawn from a generator seeded with `(seed, b)`, so the images depend
on `seed` and `batch_size` only: not on the number of processes, nor on which process drew which batch,
nor on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path, read_json

__all__ = ["eval_labels", "batch_seed", "sample_images", "pack_npz", "LABEL_MODES", "SETTINGS_NAME", "LABELS_NAME"]

LABEL_MODES = ("balanced", "random")
#: written into the sample folder: the settings the images were drawn with (a resumed run must match)
SETTINGS_NAME = "eval_settings.json"
#: written beside it: the class label of every sample (int64 `[num_samples]`), `arr_1` of the `.npz`
LABELS_NAME = "eval_labels.npy"


def eval_labels(num_samples: int, num_classes: int, mode: str = "balanced", seed: int = 0) -> torch.Tensor:
    """Class label of every sample `[num_samples]`: `i % num_classes`, or a seeded uniform draw."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if mode == "balanced":
        return torch.arange(num_samples) % num_classes
    if mode == "random":
        gen = torch.Generator().manual_seed(batch_seed(seed, -1))
        return torch.randint(0, num_classes, (num_samples,), generator=gen)
    raise ValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}")


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed for batch `batch` of a run seeded with `seed` (distinct pairs give unrelated seeds)."""
    entropy = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(batch) & 0xFFFFFFFF]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def _prepare_folder(folder: Path, settings: dict[str, Any], labels: torch.Tensor, *, create: bool) -> None:
    """Record `settings` and `labels` in a new folder (`create`), or check that they match the recorded ones."""
    settings_path, labels_path = folder / SETTINGS_NAME, folder / LABELS_NAME
    if settings_path.is_file():
        saved = read_json(settings_path)
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if not differ and not np.array_equal(np.load(labels_path), labels.numpy()):
            differ = ["labels"]
        if not differ:
            return
        if not (create and not any(folder.glob("*.png"))):
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise ValueError(f"{folder} holds samples drawn with other settings ({detail}); use a new folder "
                             "or the same settings to resume")
        settings_path.unlink()  # nothing was drawn with them (a call that failed early): record the new ones
    if not create:
        raise RuntimeError(f"{folder} has no {SETTINGS_NAME}: rank 0 writes it first (pass barrier= when "
                           "several processes sample into one folder)")
    if any(folder.glob("*.png")):
        raise ValueError(f"{folder} already holds PNG files but no {SETTINGS_NAME}: use an empty folder")
    with atomic_path(labels_path) as tmp:  # settings last: they mark the folder as set up
        np.save(tmp, labels.numpy(), allow_pickle=False)
    with atomic_path(settings_path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))


def sample_images(wrapper, vq, out_dir: str | os.PathLike[str], *, num_samples: int, batch_size: int = 64,
                  seed: int = 0, labels: str | torch.Tensor = "balanced", grid: int | Sequence[int] | None = None,
                  eval_size: int | None = None, rank: int = 0, world_size: int = 1, progress: bool = True,
                  compile: bool | dict = False, writers: int = 4,
                  extra_settings: dict[str, Any] | None = None, barrier: Callable[[], None] | None = None,
                  **sampling: Any) -> Path:
    """Draw `num_samples` images with `wrapper.generate` and write them as `out_dir/<index:06d>.png`.

    Process `rank` of `world_size` draws batches `rank, rank + world_size, ...`; batches whose PNGs all
    exist are skipped (resume). Every batch is drawn at the full `batch_size` (the last one is cut),
    so a compiled step is built once. `sampling` goes to `generate` (cfg_scale, top_k, temperature, ...).
    `eval_size` resizes the decoded images (bicubic, as LlamaGen evaluates its 384-px models at 256 px);
    `writers` threads encode the PNGs while the next batch is sampled.
    The folder records the settings; resuming with different ones is an error. Returns `out_dir`.
    """
    from ..models.vq import tensor_to_uint8
    from ..visualize import decode_tokens

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if writers < 1:
        raise ValueError(f"writers must be >= 1, got {writers}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"eval_size must be >= 1, got {eval_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    try:  # a misspelt setting fails here, before the folder records anything
        inspect.signature(wrapper.generate).bind(None, **sampling)
    except TypeError as err:
        raise TypeError(f"sample_images passes **sampling to wrapper.generate: {err}") from None
    num_classes = wrapper.adapter.num_classes
    if isinstance(labels, str):
        if num_classes is None:
            raise ValueError("this backbone does not report its number of classes: pass labels as a tensor")
        label_mode = labels
        labels = eval_labels(num_samples, num_classes, labels, seed)
    else:
        label_mode = "given"
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != num_samples:
            raise ValueError(f"labels has {labels.numel()} entries but num_samples is {num_samples}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed, "labels": label_mode,
                "num_classes": num_classes, "eval_size": eval_size,
                **{k: _recordable(v) for k, v in sampling.items()},
                **(extra_settings or {})}
    if rank == 0:
        _prepare_folder(folder, settings, labels, create=True)
    if barrier is not None:
        barrier()
    if rank != 0:  # now recorded: every process checks that it continues the same run
        _prepare_folder(folder, settings, labels, create=False)

    from tqdm import tqdm

    device = next(wrapper.parameters()).device
    num_batches = math.ceil(num_samples / batch_size)
    mine = [b for b in range(rank, num_batches, world_size)]
    todo = [b for b in mine if not all(_image_path(folder, i).is_file()
                                        for i in range(b * batch_size, min((b + 1) * batch_size, num_samples)))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress or rank != 0, unit="batch",
               desc=f"sampling {num_samples} images")
    # PNG encoding (~10 ms per 256-px image) runs in threads while the next batch is sampled
    with ThreadPoolExecutor(max_workers=writers) as pool:
        pending: deque[Future] = deque()
        for b in todo:
            start, stop = b * batch_size, min((b + 1) * batch_size, num_samples)
            # full-size batches: the last one is padded with the first samples' labels and cut after decoding
            index = torch.arange(b * batch_size, (b + 1) * batch_size) % num_samples
            gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
            tokens = wrapper.generate(labels[index].to(device), generator=gen, compile=compile, **sampling)
            decoded = decode_tokens(vq, tokens[: stop - start], grid).float()
            if eval_size is not None and decoded.shape[-2:] != (eval_size, eval_size):
                decoded = F.interpolate(decoded, size=(eval_size, eval_size), mode="bicubic")
            images = tensor_to_uint8(decoded.clamp(-1, 1))
            _wait(pending, keep=batch_size)  # at most one batch of images waits in memory
            pending.extend(pool.submit(_write_png, array, _image_path(folder, start + i))
                           for i, array in enumerate(images))
            bar.update(1)
        _wait(pending, keep=0)
    bar.close()
    return folder


def _recordable(value: Any) -> Any:
    """A sampling setting as JSON can hold it, so that a resume with another value is noticed: numpy
    scalars become numbers, tensors (a `cond_mask`) lists, anything else its repr."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)


def _write_png(array: np.ndarray, target: Path) -> None:
    from PIL import Image

    with atomic_path(target) as tmp:
        Image.fromarray(array).save(tmp)


def _wait(pending: deque[Future], keep: int) -> None:
    """Wait until at most `keep` writes are pending (raising the first failure)."""
    while len(pending) > keep:
        pending.popleft().result()


def pack_npz(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             num_samples: int | None = None, progress: bool = True) -> Path:
    """Pack `folder/<index:06d>.png` (indices `0 .. num_samples-1`) into an ADM-evaluator `.npz`.

    `arr_0`: uint8 `[N, H, W, 3]`; `arr_1`: the labels, when the folder records them. Default
    `out`: `<folder>.npz`; `num_samples` defaults to the recorded settings'. Missing files are an error.
    """
    from PIL import Image
    from tqdm import tqdm

    folder = Path(folder)
    settings_path = folder / SETTINGS_NAME
    settings = read_json(settings_path) if settings_path.is_file() else {}
    if num_samples is None:
        num_samples = settings.get("num_samples")
        if num_samples is None:
            num_samples = len(list(folder.glob("[0-9]*.png")))
    if num_samples < 1:
        raise ValueError(f"{folder} holds no samples")
    missing = [i for i in range(num_samples) if not _image_path(folder, i).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {len(missing)} of {num_samples} samples (first: "
                                f"{_image_path(folder, missing[0]).name}); run the sampling again to finish it")
    # <folder>.npz, appended: with_suffix would turn "b256_cfg1.5" and "b256_cfg1.75" both into "b256_cfg1.npz"
    out = Path(out) if out is not None else folder.with_name(folder.name + ".npz")
    first = np.asarray(Image.open(_image_path(folder, 0)).convert("RGB"))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples, *first.shape)}
    # streamed into the zip image by image: 50k 256-px images are 9.8 GB, never held in memory at once
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for i in tqdm(range(num_samples), disable=not progress, desc="packing", unit="img"):
                image = np.asarray(Image.open(_image_path(folder, i)).convert("RGB"))
                if image.shape != first.shape:
                    raise ValueError(f"{_image_path(folder, i)} is {image.shape[1]}x{image.shape[0]}, the others "
                                     f"{first.shape[1]}x{first.shape[0]}")
                f.write(np.ascontiguousarray(image).tobytes())
        if (folder / LABELS_NAME).is_file():
            labels = np.load(folder / LABELS_NAME)
            if len(labels) < num_samples:
                raise ValueError(f"{folder / LABELS_NAME} holds {len(labels)} labels for {num_samples} samples")
            with archive.open("arr_1.npy", "w") as f:  # the first num_samples, like the images
                np.lib.format.write_array(f, labels[:num_samples].astype(np.int64))
    return out
