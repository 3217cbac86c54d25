"""Encode images into LlamaGen's code layout, the data step before fine-tuning: resumable and split over processes.

For every image ``i`` (in torchvision ``ImageFolder``'s order for a folder, or as given)::

    <out_root>/<name>_codes/<i>.npy     int64 (1, n_aug, h*w)   the image and its mirror (n_aug 2), or ten crops
    <out_root>/<name>_labels/<i>.npy    int64 (1,)              the class id
    <out_root>/<name>_classes.json      the class folder names (image folders only)
    <out_root>/<name>_tokenize.json     how the codes were made (ours; LlamaGen's readers ignore it)

the files LlamaGen's ``extract_codes_c2i.py`` writes, with or without its ``--ten-crop`` option. Each
file is written to a hidden temporary name and renamed, label before codes, so a code file that exists is
complete: an interrupted run resumes by encoding only the images whose code file is missing, after checking
in the record that the images, the tokenizer's weights and the preprocessing are the same. Process ``rank``
of ``world_size`` encodes batches ``rank, rank + world_size, ...``; the files do not depend on how many
processes wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checks import is_integer
from .files import atomic_path

__all__ = ["tokenize_images", "check_output_name", "distributed_sync", "center_crop", "ten_crop_views",
           "IMAGE_EXTENSIONS", "CODES_SUFFIX", "LABELS_SUFFIX", "RECORD_SUFFIX"]

#: File extensions `tokenize_images` reads from a folder (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

CODES_SUFFIX = "_codes"
LABELS_SUFFIX = "_labels"
#: `<name>_tokenize.json`: the settings a codes folder was made with, checked when a run resumes
RECORD_SUFFIX = "_tokenize.json"


# --------------------------------------------------------------------------------------------
# Images in, uint8 arrays out
# --------------------------------------------------------------------------------------------


def center_crop(image: Any, size: int) -> Any:
    """Resize a PIL image so its shorter side is `size`, then crop the central `size x size` square.

    Large images are first halved with a box filter while they stay at least twice the target, then
    resized with a bicubic filter (the ADM / LlamaGen recipe), which avoids aliasing.
    """
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def ten_crop_views(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``TenCrop(size)`` of a uint8 array ``[H, W, 3]`` -> ``[10, size, size, 3]``: the four corner
    crops and the centre crop, then the same five of the mirrored image (LlamaGen's ``--ten-crop`` views)."""
    height, width = image.shape[:2]
    if size > min(height, width):
        raise ValueError(f"ten_crop size {size} is larger than the image ({width}x{height})")

    def five(a: np.ndarray) -> list[np.ndarray]:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))  # torchvision's centre
        return [a[:size, :size], a[:size, width - size:], a[height - size:, :size],
                a[height - size:, width - size:], a[top: top + size, left: left + size]]

    return np.stack(five(image) + five(image[:, ::-1]))


def _scan_folder(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision's ``ImageFolder`` order: class sub-folders sorted by name (label = position); in each, the
    folders of ``sorted(os.walk(...))`` (symlinks followed) and their image files sorted by name. Hidden
    sub-folders are not classes. Paths are kept as strings (a ``Path`` per ImageNet file costs ~0.5 GB)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders (expected <folder>/<class name>/<image files>)")
    items: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        count = len(items)
        for root, _, files in sorted(os.walk(folder / name, followlinks=True)):
            items.extend((os.path.join(root, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        if len(items) == count:
            empty.append(name)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{folder / empty[0]}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this class "
                         f"folder{more}; every sub-folder of the image folder is a class")
    return items, classes


def _as_items(images: Any, labels: Any) -> list[tuple[Any, int]]:
    """Pair in-memory images (a uint8 array [N, H, W, 3] / [N, H, W], or a list) with their labels."""
    if labels is None:
        raise ValueError("labels are required for in-memory images (one class id per image); "
                         "only an image folder gives its labels by sub-folder")
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"an image array must be uint8 [N, H, W, 3] or [N, H, W], got {images.dtype} "
                             f"{images.shape}")
        images = list(images)
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise ValueError(f"images must be a folder, a uint8 array or a list of PIL images / arrays, got "
                         f"{type(images).__name__}")
    if not len(images):
        raise ValueError("images must not be empty")
    label_array = np.asarray(labels).reshape(-1)
    if label_array.dtype.kind not in "iu":  # int() would truncate 0.9 to 0 without a word
        raise ValueError(f"labels must be integer class ids, got dtype {label_array.dtype}")
    labels = [int(x) for x in label_array]
    if len(labels) != len(images):
        hint = ""
        if len(labels) == 1 and len(images) > 1 and getattr(images[0], "ndim", 0) == 2:
            hint = " (a 3-d array is read as [N, H, W] grey images; pass one RGB image as [1, H, W, 3])"
        raise ValueError(f"got {len(images)} images but {len(labels)} labels{hint}")
    if any(x < 0 for x in labels):
        raise ValueError("labels must be class ids >= 0")
    return list(zip(images, labels, strict=True))


def _where(item: Any, index: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"


def _prepare(item: Any, image_size: int | None, where: str) -> np.ndarray:
    """One image (path, PIL image or uint8 array) -> uint8 RGB array [H, W, 3], center-cropped if asked."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        with _open_image(item, where) as opened:
            image = _to_rgb(opened, where)
    elif isinstance(item, Image.Image):
        image = _to_rgb(item, where)
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"{where}: image arrays must be uint8, got {item.dtype}")
        if item.ndim == 2:
            item = np.repeat(item[..., None], 3, axis=-1)
        if item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(f"{where}: image arrays must be [H, W, 3] or [H, W], got {item.shape}")
        if image_size is None:
            return item
        image = Image.fromarray(item)
    else:
        raise ValueError(f"{where}: expected a PIL image or a uint8 array, got {type(item).__name__}")
    if image_size is not None:
        image = center_crop(image, image_size)
    return np.asarray(image)


def _open_image(path: str | os.PathLike[str], where: str) -> Any:
    """The decoded PIL image of a file; any failure (PIL raises many kinds for a damaged file) names the file."""
    from PIL import Image

    image = None
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as exc:  # noqa: BLE001
        if image is not None:
            image.close()
        raise ValueError(f"{where}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _to_rgb(image: Any, where: str) -> Any:
    """A PIL image as 8-bit RGB. 16-bit greyscale (PNG, TIFF) keeps its high byte: PIL's own ``convert("RGB")``,
    which LlamaGen's pipeline uses, clips it to 255 and turns most such images white. Float images are refused."""
    from PIL import Image

    if image.mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (32-bit, how some readers give 16-bit files)
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{where}: {image.mode} image with values outside 0..65535; convert it to 8-bit first")
        image = Image.fromarray((values >> 8).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError(f"{where}: floating-point image (mode F); convert it to 8-bit first")
    return image.convert("RGB")


def _crop_size(image_size: int, crop_range: float) -> int:
    """The center crop that ten crops are cut from, as LlamaGen computes it (``int(image_size * crop_range)``)."""
    return int(image_size * crop_range)


def _views(item: Any, index: int, image_size: int | None, crop_range: float | None) -> np.ndarray:
    """The views of one image before the mirror: ``[1, S, S, 3]``, or ``[10, S, S, 3]`` with ten crops."""
    where = _where(item, index)
    if crop_range is None:
        return _prepare(item, image_size, where)[None]
    return ten_crop_views(_prepare(item, _crop_size(image_size, crop_range), where), image_size)


class _PreparedImages(Dataset):
    """`(index, uint8 [V, S, S, 3])` for the images `indices`, for a DataLoader whose workers decode and crop."""

    def __init__(self, items: list[tuple[Any, int]], indices: list[int], image_size: int | None,
                 crop_range: float | None, side: int):
        self.items, self.indices, self.image_size, self.crop_range, self.side = (items, indices, image_size,
                                                                                 crop_range, side)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, np.ndarray]:
        index = self.indices[position]
        views = _views(self.items[index][0], index, self.image_size, self.crop_range)
        if views.shape[1:3] != (self.side, self.side):
            raise ValueError(f"{_where(self.items[index][0], index)}: image is {views.shape[2]}x{views.shape[1]}, "
                             f"but the first image is {self.side}x{self.side}; pass image_size= to resize and crop "
                             f"all images to one size")
        return index, views


def _stack(batch: list[tuple[int, np.ndarray]]) -> tuple[list[int], np.ndarray]:
    return [index for index, _ in batch], np.stack([array for _, array in batch])


# --------------------------------------------------------------------------------------------
# The record: what the codes were made from
# --------------------------------------------------------------------------------------------


def _item_key(item: Any, prefix: str) -> str:
    """A file's path inside the image folder (`prefix`: the folder and a separator); an in-memory image's hash."""
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str):
        return item[len(prefix):].replace(os.sep, "/")
    if isinstance(item, np.ndarray):
        data, shape = np.ascontiguousarray(item).tobytes(), f"{item.dtype}{item.shape}"
    else:  # a PIL image
        data, shape = item.tobytes(), f"{item.mode}{item.size}"
    return f"{shape}:{hashlib.sha256(data).hexdigest()}"


def _items_digest(items: list[tuple[Any, int]], folder: Path | None) -> str:
    """SHA-256 over every image's key and label, in order: the same images in the same classes, wherever the
    folder lies (a file edited in place under the same name is not noticed)."""
    prefix = os.path.join(str(folder), "") if folder is not None else ""
    digest = hashlib.sha256()
    for item, label in items:
        digest.update(f"{_item_key(item, prefix)}\t{label}\n".encode())
    return digest.hexdigest()


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of the tokenizer's parameters (in order: dtype, shape, bytes), so that codes of two tokenizers
    never mix. Names are left out (a wrapped model is the same tokenizer), and so are buffers (a VQ's usage
    statistics change as it trains, not what it encodes)."""
    digest = hashlib.sha256()
    for value in model.parameters():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#: the ways out of a refused output, named for the Python API and for `tensorar tokenize` alike
_START_AGAIN = "overwrite=True (`--overwrite`) deletes them and starts again"
_ELSEWHERE = "choose another out_root / name (`--out` / `--name`) to write beside them"


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable record of a tokenization ({exc}); {_ELSEWHERE}, or "
                         f"{_START_AGAIN}") from exc


def _npy_files(folder: Path, *, finished_only: bool = False) -> Iterator[Path]:
    """The `.npy` files in `folder` (with hidden partial ones unless `finished_only`), lazily."""
    if folder.is_dir():
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".npy") and not (finished_only and entry.name.startswith(".")):
                    yield Path(entry.path)


def _set_up_output(out_root: Path, name: str, record: dict[str, Any], classes: list[str] | None, *,
                   overwrite: bool, resume: bool) -> None:
    """Rank 0: start a new output (wiping an old one with `overwrite`, or one where no image was finished), or
    check that `resume` continues the run the record describes; a ValueError when the output must stay as is."""
    codes_dir, labels_dir = out_root / f"{name}{CODES_SUFFIX}", out_root / f"{name}{LABELS_SUFFIX}"
    record_path = out_root / f"{name}{RECORD_SUFFIX}"
    for path in (out_root, codes_dir, labels_dir):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path}: a file is where the output folder goes; {_ELSEWHERE}")
    finished = next(_npy_files(codes_dir, finished_only=True), None) is not None
    if record_path.is_file() and finished and not overwrite:
        _check_resumable(record_path, _read_record(record_path), record, codes_dir, resume)
        labels_dir.mkdir(exist_ok=True)
        return
    if not overwrite and not record_path.is_file():
        for folder in (codes_dir, labels_dir):
            count = sum(1 for _ in _npy_files(folder))
            if count:
                raise ValueError(f"{folder}: already holds {count} .npy files"
                                 + (" and no record of how they were made, so they cannot be resumed"
                                    if resume else "") + f". Codes made elsewhere (LlamaGen's extract_codes_c2i.py, "
                                 f"say) need no tokenizing: fine-tune on them as they are (`tensorar finetune "
                                 f"--codes {out_root}`); or {_ELSEWHERE}, or {_START_AGAIN}")
    # a new output, or one to wipe: asked to, or a run that stopped before it finished any image
    for path in [*_npy_files(codes_dir), *_npy_files(labels_dir)]:
        path.unlink()
    (out_root / f"{name}_classes.json").unlink(missing_ok=True)
    record_path.unlink(missing_ok=True)
    for folder in (codes_dir, labels_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if classes is not None:
        with atomic_path(out_root / f"{name}_classes.json") as tmp:
            tmp.write_text(json.dumps({"classes": classes}, indent=1) + "\n")
    with atomic_path(record_path) as tmp:  # last: it marks the output as set up
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _check_resumable(record_path: Path, saved: dict[str, Any], record: dict[str, Any], codes_dir: Path,
                     resume: bool) -> None:
    """An output with finished images may only be continued with `resume`, by a run with the recorded settings."""
    if not resume:
        done = sum(1 for _ in _npy_files(codes_dir, finished_only=True))
        raise ValueError(f"{codes_dir}: already holds {done} .npy files (codes of {done} of "
                         f"{saved.get('num_images')} images); resume=True finishes them (`tensorar tokenize` "
                         f"resumes by default), or {_ELSEWHERE}, or {_START_AGAIN}")
    differ = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {record.get(k)!r} now" for k in differ)
        raise ValueError(f"{record_path}: the codes there were made from other images or settings ({detail}); "
                         f"resume with the same images, tokenizer and settings, or {_ELSEWHERE}, or {_START_AGAIN}")


def _check_output(out_root: Path, name: str, record: dict[str, Any]) -> None:
    """Ranks other than 0: the record rank 0 wrote must be this process's own."""
    record_path = out_root / f"{name}{RECORD_SUFFIX}"
    if not record_path.is_file():
        raise RuntimeError(f"{record_path} is missing: rank 0 writes it first (pass sync= when several "
                           f"processes tokenize into one folder)")
    if _read_record(record_path) != record:
        raise RuntimeError(f"{record_path}: rank 0 recorded other settings than this process has (different "
                           f"images, tokenizer weights or arguments per process)")


def distributed_sync(message: str | None) -> str | None:
    """`sync=` for `torch.distributed`: every process gets rank 0's set-up outcome (its error message or None)."""
    import torch.distributed as dist

    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _model_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _save_item(codes_dir: Path, labels_dir: Path, index: int, codes: np.ndarray, label: int) -> None:
    """Label first, codes last: a code file that exists marks a finished image."""
    with atomic_path(labels_dir / f"{index}.npy") as tmp:
        np.save(tmp, np.array([label], dtype=np.int64), allow_pickle=False)
    with atomic_path(codes_dir / f"{index}.npy") as tmp:
        np.save(tmp, codes[None], allow_pickle=False)


def _encode(vq_model: nn.Module, views: torch.Tensor, max_views: int) -> torch.Tensor:
    """Codes of `views` [V, 3, S, S], at most `max_views` per call to the tokenizer (its activations at
    full resolution are what fills the GPU, so ten crops of a batch must not go in at once)."""
    return torch.cat([vq_model.encode_to_codes(part) for part in views.split(max_views)])


def check_output_name(name: object, what: str = "name") -> None:
    """`name` must be a plain prefix: `out_root/<name>_codes` has to stay inside `out_root`."""
    separators = ("/", "\\", os.sep)
    if not isinstance(name, str) or not name or name.startswith(".") or any(sep in name for sep in separators):
        raise ValueError(f"{what} must be a plain folder prefix (no path separators, not starting with '.'), "
                         f"got {name!r}: the output goes to <out>/<name>_codes")


@torch.no_grad()
def tokenize_images(images_or_folder: Any, vq_model: nn.Module, out_root: str | os.PathLike[str],
                    labels: Any = None, *, batch_size: int = 32, device: str | torch.device | None = None,
                    progress: bool = True, flip: bool = True, image_size: int | None = None,
                    ten_crop: bool = False, crop_range: float = 1.1, name: str | None = None,
                    overwrite: bool = False, resume: bool = False, num_workers: int = 0,
                    rank: int = 0, world_size: int = 1,
                    sync: Callable[[str | None], str | None] | None = None) -> Path:
    """Encode images into LlamaGen's code layout under `out_root`; return the ``*_codes`` folder.

    Args:
        images_or_folder: a folder with one sub-folder per class (labels = sorted sub-folder index,
            like torchvision's ``ImageFolder``; the class names are written to
            ``<name>_classes.json``), or a uint8 array ``[N, H, W, 3]`` / a list of PIL images or
            uint8 arrays together with ``labels``.
        vq_model: a :class:`~tensorar_plugin.models.vq.VQModel` (anything with ``encode_to_codes``).
        labels: class ids for in-memory images (not allowed with a folder).
        batch_size: images read per step. The tokenizer takes at most ``2 * batch_size`` views per call
            (each image and its mirror), so with `ten_crop` a step's views are encoded in pieces and
            the memory a batch size needs does not depend on `ten_crop`.
        device: where to encode; the model is moved there. Default: where the model is.
        progress: show a tqdm progress bar (rank 0 only).
        flip: also store the horizontally flipped image as a second augmentation (LlamaGen does).
        image_size: resize + center-crop every image to this square size first (LlamaGen's
            preprocessing); default: use images as they are (they must then share one size).
        ten_crop: store ten views of `image_size` instead: the image is center-cropped to
            ``int(image_size * crop_range)``, then cut into torchvision's ``TenCrop`` (four corners and the
            centre, of the image and of its mirror), as LlamaGen's ``--ten-crop`` extraction does (its
            GETTING_STARTED.md uses ``--ten-crop --crop-range 1.1``). Needs `image_size`.
        crop_range: how much larger than `image_size` the crop the ten views are cut from is (>= 1).
        name: folder prefix: ``<name>_codes`` / ``<name>_labels`` (default ``images<H>``, like
            LlamaGen's ``imagenet256``).
        overwrite: delete the files of an existing output and start again.
        resume: finish an interrupted run: encode only the images without a code file. The output's
            record must match this call (same images and labels, tokenizer weights and dtype, image_size,
            flip, ten_crop and crop_range); anything else is a ``ValueError``. Without `resume` or
            `overwrite` an output holding finished images is refused (one where a run stopped before
            finishing any image is started again).
        num_workers: DataLoader worker processes that read and crop images while the model encodes
            (0: in this process).
        rank, world_size: this process's share: batches ``rank, rank + world_size, ...`` (torchrun).
        sync: required when several processes write one output: called by every process once rank 0
            has set it up, with rank 0's outcome (its error message, or None) on rank 0; must return
            rank 0's value on every process, as :func:`distributed_sync` does for ``torch.distributed``.
            So a refusal (say, a resume with other settings) is the same ``ValueError`` on every process
            instead of one error and processes waiting for rank 0.

    Files are ``<i>.npy`` of shape ``(1, n_aug, h*w)`` (int64) and labels of shape ``(1,)``, exactly
    what LlamaGen's ``extract_codes_c2i.py`` writes, so :class:`~tensorar_plugin.data.CodesDataset` reads
    them, and so does LlamaGen's own ``train_c2i.py`` for ImageNet (which hard-codes the folder names
    ``imagenet<size>_codes`` / ``_labels``: pass ``name="imagenet256"``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size is not None:
        if not is_integer(image_size) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        image_size = int(image_size)  # a NumPy integer would not go into the JSON record
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if world_size > 1 and sync is None:
        raise ValueError(f"world_size={world_size} needs sync= (image_codes.distributed_sync under torch.distributed): "
                         f"the processes must learn whether rank 0 set up the output before they write into it")
    if ten_crop:
        if image_size is None:
            raise ValueError("ten_crop=True needs image_size (the size of each of the ten crops)")
        if not flip:
            raise ValueError("ten_crop=True stores mirrored crops by itself (five of the ten views): flip=False "
                             "cannot apply to it")
        if isinstance(crop_range, bool) or not isinstance(crop_range, (int, float)) or not 1.0 <= crop_range < 4.0:
            raise ValueError(f"crop_range must be a number in [1, 4), got {crop_range!r}")
    if overwrite and resume:
        raise ValueError("overwrite=True and resume=True contradict each other: pass one of them")
    if name is not None:
        check_output_name(name)
    classes: list[str] | None = None
    folder: Path | None = None
    if isinstance(images_or_folder, (str, os.PathLike)):
        folder = Path(images_or_folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: " + ("not a folder (expected an image folder with one sub-folder per class)"
                                              if folder.exists() else "image folder not found"))
        if labels is not None:
            raise ValueError("labels must not be given with an image folder: they come from its sub-folders")
        items, classes = _scan_folder(folder)
    else:
        items = _as_items(images_or_folder, labels)

    range_used = float(crop_range) if ten_crop else None
    first = _views(items[0][0], 0, image_size, range_used)
    height, width = first.shape[1:3]
    if height != width:  # the codes would not form the square token grid CodesDataset and LlamaGen expect
        raise ValueError(f"{_where(items[0][0], 0)}: images are {width}x{height}, not square; pass image_size= to "
                         f"resize and center-crop them to a square")
    if device is not None:
        vq_model.to(device)
    was_training = vq_model.training
    vq_model.eval()
    try:
        return _encode_all(items, classes, folder, first, vq_model, Path(out_root), name, batch_size=batch_size,
                           progress=progress, flip=flip, image_size=image_size, crop_range=range_used,
                           overwrite=overwrite, resume=resume, num_workers=num_workers, rank=rank,
                           world_size=world_size, sync=sync)
    finally:
        vq_model.train(was_training)


def _encode_all(items: list[tuple[Any, int]], classes: list[str] | None, folder: Path | None, first: np.ndarray,
                vq_model: nn.Module, out_root: Path, name: str | None, *, batch_size: int, progress: bool,
                flip: bool, image_size: int | None, crop_range: float | None, overwrite: bool, resume: bool,
                num_workers: int, rank: int, world_size: int,
                sync: Callable[[str | None], str | None] | None) -> Path:
    """`tokenize_images` once its arguments are checked and the model is in eval mode."""
    from tqdm import tqdm

    from .models.vq import images_to_tensor

    model_device, model_dtype = _model_place(vq_model)
    # before any file is written: an image size the tokenizer cannot take fails here, not after the set-up
    vq_model.encode_to_codes(images_to_tensor(first[:1]).to(model_device, model_dtype))
    side = first.shape[1]
    record = {"num_images": len(items), "images_sha256": _items_digest(items, folder), "image_size": image_size,
              "pixels": side, "flip": flip, "ten_crop": crop_range, "vq_sha256": _weights_digest(vq_model)}
    name = name or f"images{side}"
    codes_dir, labels_dir = out_root / f"{name}{CODES_SUFFIX}", out_root / f"{name}{LABELS_SUFFIX}"
    failure: BaseException | None = None
    if rank == 0:
        try:
            _set_up_output(out_root, name, record, classes, overwrite=overwrite, resume=resume)
        except Exception as error:  # noqa: BLE001 - shared with the other processes below, then raised
            failure = error
    if sync is not None:
        message = sync(None if failure is None else str(failure))
        if message is not None and failure is None:  # rank 0 refused: every process stops with its reason
            raise ValueError(message)
    if failure is not None:
        raise failure
    if rank != 0:
        _check_output(out_root, name, record)

    max_views = 2 * batch_size  # an image and its mirror: ten crops are encoded in pieces of this size
    num_batches = -(-len(items) // batch_size)
    mine = [i for b in range(rank, num_batches, world_size) for i in range(b * batch_size,
                                                                           min((b + 1) * batch_size, len(items)))]
    labelled = {path.name for path in _npy_files(labels_dir, finished_only=True)}
    todo = [i for i in mine if f"{i}.npy" not in labelled or not (codes_dir / f"{i}.npy").is_file()]
    loader = DataLoader(_PreparedImages(items, todo, image_size, crop_range, side), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_stack)
    what = f"{len(items)} images" + (f" in {len(classes)} classes" if classes is not None else "")
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"tokenizing {what}", unit="img",
              disable=not progress or rank != 0) as bar:
        for indices, arrays in loader:  # arrays: uint8 [N, V, S, S, 3], V = 10 ten crops or 1 image
            x = images_to_tensor(arrays.reshape(-1, *arrays.shape[2:])).to(model_device, model_dtype)
            if crop_range is not None:  # the ten views of each image, in TenCrop's order
                codes = _encode(vq_model, x, max_views).reshape(len(indices), arrays.shape[1], -1)
            elif flip:  # each image, then its mirror (LlamaGen: torch.cat([x, torch.flip(x, dims=[-1])]))
                codes = _encode(vq_model, torch.cat([x, x.flip(-1)]), max_views).reshape(2, len(indices), -1)
                codes = codes.transpose(0, 1)
            else:
                codes = _encode(vq_model, x, max_views).reshape(len(indices), 1, -1)
            codes = codes.to(torch.int64).cpu().numpy()
            for row, index in enumerate(indices):
                _save_item(codes_dir, labels_dir, index, codes[row], items[index][1])
            bar.update(len(indices))
    return codes_dir
