"""Datasets of image tokens for fine-tuning, and a tokenizer that writes LlamaGen's code layout.

LlamaGen trains on precomputed VQ codes rather than on pixels. Its extraction script writes, for
every image ``i``, two NumPy files::

    <root>/<name>_codes/<i>.npy    int64, shape (1, n_aug, h*w)   (n_aug = 2: the image and its mirror)
    <root>/<name>_labels/<i>.npy   int64, shape (1,)              (the class id)

:class:`CodesDataset` reads that layout (arrays of shape ``(n_aug, h*w)`` or ``(h*w,)`` work as
well) and picks one augmentation per item; :class:`TokenDataset` serves in-memory tensors the same
way; :func:`tokenize_images` (in :mod:`tensorar_plugin.image_codes`, re-exported here) writes the layout
from an image folder (one sub-folder per class, as torchvision's ``ImageFolder``) or from arrays / PIL
images, with a :class:`~tensorar_plugin.models.vq.VQModel`.

Both datasets return ``(codes, label)``: a ``LongTensor [h*w]`` and a 0-d ``LongTensor``. Which
augmentation an item uses is drawn from a generator seeded with ``(seed, epoch, index)``, so it does
not depend on the number of data-loader workers or on the order in which items are read, and a
resumed run sees exactly the augmentations the uninterrupted run would have seen (call
``set_epoch`` at the start of every epoch, as :class:`~tensorar_plugin.train.Trainer` does).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_codes import CODES_SUFFIX, IMAGE_EXTENSIONS, LABELS_SUFFIX, center_crop, tokenize_images

__all__ = ["CodesDataset", "CodeSetsDataset", "TokenDataset", "tokenize_images", "IMAGE_EXTENSIONS", "center_crop"]



# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _pick_augmentation(seed: int, epoch: int, index: int, n_aug: int) -> int:
    """Augmentation used by item `index` in `epoch`: uniform over `n_aug`, a pure function of its inputs."""
    if n_aug <= 1:
        return 0
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF])
    return int(rng.integers(n_aug))


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _check_ids(ids: np.ndarray, codebook_size: int | None, where: str) -> None:
    """ValueError naming `where` when `ids` holds negative ids or ids >= codebook_size."""
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise ValueError(f"{where}: token ids must be >= 0, found {low}")
    if codebook_size is not None and high >= codebook_size:
        raise ValueError(f"{where}: token id {high} is beyond the codebook (codebook_size={codebook_size}, "
                         f"valid ids 0..{codebook_size - 1}); were these codes made with another tokenizer?")


def _codes_matrix(array: np.ndarray, where: str) -> np.ndarray:
    """Codes of one image as `[n_aug, length]`, from `(1, n_aug, L)`, `(n_aug, L)` or `(L,)`."""
    if array.dtype.kind not in "iu":
        raise ValueError(f"{where}: codes must be integer token ids, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 1:
        array = array[None]
    elif array.ndim != 2:
        raise ValueError(f"{where}: codes must have shape (1, n_aug, h*w), (n_aug, h*w) or (h*w,), "
                         f"got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{where}: codes array is empty (shape {array.shape})")
    return array


def _check_length(length: int, num_tokens: int | None, where: str, reference: str | None = None) -> None:
    if num_tokens is not None and length != num_tokens:
        source = f" (as in {reference})" if reference else ""
        side = math.isqrt(num_tokens)
        grid = f", a {side}x{side} grid" if side * side == num_tokens else ""
        raise ValueError(f"{where}: wrong grid size: {length} tokens per image, expected {num_tokens}{grid}{source}. "
                         f"Were the codes extracted at another image size or with another tokenizer?")
    if not _is_square(length):
        raise ValueError(f"{where}: wrong grid size: {length} tokens per image is not a square h x w grid")


def _label_value(array: np.ndarray, num_classes: int | None, where: str) -> int:
    if array.dtype.kind not in "iu":
        raise ValueError(f"{where}: the label must be an integer class id, got dtype {array.dtype}")
    if array.size != 1:
        raise ValueError(f"{where}: a label file must hold one class id, got shape {array.shape}")
    value = int(array.reshape(-1)[0])
    if value < 0 or (num_classes is not None and value >= num_classes):
        upper = f"{num_classes - 1}" if num_classes is not None else "..."
        raise ValueError(f"{where}: class id {value} is outside [0, {upper}]")
    return value


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _AugmentedDataset(Dataset):
    """Epoch-aware augmentation choice shared by both datasets."""

    seed: int
    augment: bool
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of `epoch` (the item -> augmentation map changes every epoch)."""
        self.epoch = int(epoch)

    def _augmentation(self, index: int, n_aug: int) -> int:
        return _pick_augmentation(self.seed, self.epoch, index, n_aug) if self.augment else 0


class CodesDataset(_AugmentedDataset):
    """LlamaGen's precomputed codes: ``<root>/<name>_codes/<i>.npy`` with labels in ``<name>_labels``.

    Args:
        root: the folder holding exactly one ``*_codes`` folder (and its ``*_labels`` sibling), or
            the ``*_codes`` folder itself.
        num_tokens: image tokens per item the model expects (``h*w``, e.g. 256 for 256 px / ds16);
            default: taken from the first file, and it must be a perfect square.
        codebook_size: token ids must be below it (the model's ``vocab_size``); unchecked when None.
        num_classes: class ids must be below it; unchecked when None.
        seed: seeds the augmentation choice (see the module docstring).
        augment: pick a random augmentation per item; False always takes the first one.
        validate: read and check every file now instead of when each item is first read.

    Every problem raises ``ValueError`` naming the offending file: a code file without a label file,
    a wrong grid size, token ids beyond the codebook, a malformed array.
    """

    def __init__(self, root: str | os.PathLike[str], *, num_tokens: int | None = None,
                 codebook_size: int | None = None, num_classes: int | None = None, seed: int = 0,
                 augment: bool = True, validate: bool = False):
        self.codes_dir, self.labels_dir = self._find_dirs(Path(root))
        if num_tokens is not None and num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if codebook_size is not None and codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self.indices = self._list_items()
        # the first file fixes the grid when it is not given: every item must then match it
        self._reference: str | None = None
        self.num_tokens = num_tokens
        first = self._read_codes(0)
        if num_tokens is None:
            self.num_tokens, self._reference = first.shape[1], str(self.code_path(0))
        self.num_augmentations = first.shape[0]
        self._read_label(0)
        if validate:
            self.verify()

    # -- layout ------------------------------------------------------------------------------
    @staticmethod
    def _find_dirs(root: Path) -> tuple[Path, Path]:
        if not root.is_dir():
            raise ValueError(f"{root}: codes folder not found (expected a folder holding <name>{CODES_SUFFIX}/ "
                             f"and <name>{LABELS_SUFFIX}/, as written by LlamaGen's extract_codes_c2i.py or "
                             f"tensorar_plugin.data.tokenize_images)")
        if root.name.endswith(CODES_SUFFIX):
            codes = root
        else:
            found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(CODES_SUFFIX))
            if not found:
                raise ValueError(f"{root}: no <name>{CODES_SUFFIX} folder inside (expected the layout written by "
                                 f"LlamaGen's extract_codes_c2i.py or tensorar_plugin.data.tokenize_images)")
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise ValueError(f"{root}: several code folders ({names}); pass the one to use, e.g. {found[0]}")
            codes = found[0]
        labels = codes.with_name(codes.name[: -len(CODES_SUFFIX)] + LABELS_SUFFIX)
        if not labels.is_dir():
            raise ValueError(f"{labels}: missing label folder for the codes in {codes}")
        return codes, labels

    def _list_items(self) -> list[str]:
        """The file stems of the items in numeric order ("10" after "9"; zero-padded names kept as written)."""
        stems = sorted((p.stem for p in self.codes_dir.glob("*.npy") if p.stem.isdigit()), key=lambda s: (int(s), s))
        if not stems:
            raise ValueError(f"{self.codes_dir}: no <i>.npy code files")
        for a, b in itertools.pairwise(stems):
            if int(a) == int(b):
                raise ValueError(f"{self.codes_dir}: {a}.npy and {b}.npy are the same item number")
        label_files = {p.name for p in self.labels_dir.glob("*.npy")}
        missing = [stem for stem in stems if f"{stem}.npy" not in label_files]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{self.labels_dir / f'{missing[0]}.npy'}: missing label file for "
                             f"{self.codes_dir / f'{missing[0]}.npy'}{more}")
        return stems

    def code_path(self, index: int) -> Path:
        return self.codes_dir / f"{self.indices[index]}.npy"

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"{self.indices[index]}.npy"

    # -- reading -------------------------------------------------------------------------------
    @staticmethod
    def _load(path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(f"{path}: file not found")
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc

    def _read_codes(self, index: int) -> np.ndarray:
        path = self.code_path(index)
        where = str(path)
        codes = _codes_matrix(self._load(path), where)
        _check_length(codes.shape[1], self.num_tokens, where, self._reference)
        _check_ids(codes, self.codebook_size, where)
        return codes

    def _read_label(self, index: int) -> int:
        path = self.label_path(index)
        return _label_value(self._load(path), self.num_classes, str(path))

    def verify(self, progress: bool = True) -> None:
        """Read and check every file (ValueError naming the first bad one); ImageNet's 1.28M items take a while."""
        from tqdm import tqdm

        quiet = not progress or len(self) < 1000
        for index in tqdm(range(len(self)), desc="checking codes", unit="file", disable=quiet):
            self._read_codes(index)
            self._read_label(index)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        codes = self._read_codes(index)
        row = codes[self._augmentation(index, codes.shape[0])]
        return torch.from_numpy(row.astype(np.int64)), torch.tensor(self._read_label(index), dtype=torch.long)

    def __repr__(self) -> str:
        return (f"CodesDataset({str(self.codes_dir)!r}, items={len(self)}, num_tokens={self.num_tokens}, "
                f"augmentations={self.num_augmentations})")


class CodeSetsDataset(_AugmentedDataset):
    """Several code sets of the same images, e.g. LlamaGen's ten crops at crop ranges 1.1 and 1.05.

    Each item reads one set, chosen uniformly, then one of that set's views, as LlamaGen's ImageNet
    dataset does with its ``ten_crop`` and ``ten_crop_105`` folders. Both choices are made here, seeded
    by ``(seed, epoch, index)`` like :class:`CodesDataset`'s (independent streams), so they do not depend
    on workers or read order, and a resumed run sees the same; the member datasets only read files (their
    own `seed`, `augment` and epoch are neither used nor changed). The sets must list the same items with
    the same grid; an item whose label differs between sets is a ``ValueError`` naming both files.
    Sets with different numbers of views are allowed with a warning: each set gets the same share of
    the items, so a view of the smaller set is read more often. ``augment=False`` (always the first view
    of the first set) takes a single set only: with more, the others would never be read.
    """

    def __init__(self, sets: Sequence[CodesDataset], *, seed: int = 0, augment: bool = True):
        sets = list(sets)
        if not sets or not all(isinstance(d, CodesDataset) for d in sets):
            raise ValueError("sets must be a non-empty sequence of CodesDataset")
        if not augment and len(sets) > 1:
            raise ValueError(f"augment=False always reads the first view of the first set, so the other "
                             f"{len(sets) - 1} set(s) would never be read: pass one set, or augment=True")
        first = sets[0]
        for other in sets[1:]:
            if other.indices != first.indices:
                missing = sorted(set(first.indices) ^ set(other.indices), key=int)
                detail = f"item {missing[0]} is in one but not the other" if missing else "they are numbered apart"
                raise ValueError(f"{other.codes_dir} and {first.codes_dir} must hold the same images: {len(other)} "
                                 f"and {len(first)} items, {detail}")
            if other.num_tokens != first.num_tokens:
                raise ValueError(f"{other.codes_dir} has {other.num_tokens} tokens per image, {first.codes_dir} "
                                 f"{first.num_tokens}: code sets of one dataset need one grid")
        views = [d.num_augmentations for d in sets]
        if len(set(views)) > 1:
            listed = ", ".join(f"{d.codes_dir} {d.num_augmentations}" for d in sets)
            warnings.warn(f"the code sets hold different numbers of views per image ({listed}): each set is read "
                          f"for the same share of items, so one view of a smaller set is read "
                          f"{max(views) / min(views):g}x as often as one of the largest", stacklevel=2)
        self.sets = sets
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self.num_tokens = first.num_tokens

    def _pick_set(self, index: int) -> int:
        if not self.augment or len(self.sets) == 1:
            return 0
        # a stream of its own (fourth seed word), independent of the view choice inside the set
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF, index & 0xFFFFFFFF, 1])
        return int(rng.integers(len(self.sets)))

    def __len__(self) -> int:
        return len(self.sets[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        chosen = self.sets[self._pick_set(index)]
        codes, label = chosen._read_codes(index), chosen._read_label(index)
        if chosen is not self.sets[0] and label != self.sets[0]._read_label(index):
            raise ValueError(f"{chosen.label_path(index)} and {self.sets[0].label_path(index)}: the code sets disagree "
                             f"on the class of this image; they must hold the same images in the same order")
        row = codes[self._augmentation(index, codes.shape[0])]
        return torch.from_numpy(row.astype(np.int64)), torch.tensor(label, dtype=torch.long)

    def verify(self, progress: bool = True) -> None:
        """Read and check every file of every set, and that the sets agree on every label."""
        for dataset in self.sets:
            dataset.verify(progress)
        for index in range(len(self)):
            labels = {dataset._read_label(index) for dataset in self.sets}
            if len(labels) > 1:
                raise ValueError(f"{self.sets[0].label_path(index)}: the code sets disagree on the class of this "
                                 f"image ({sorted(labels)})")

    def __repr__(self) -> str:
        sets = ", ".join(f"{str(d.codes_dir)!r} ({d.num_augmentations} views)" for d in self.sets)
        return f"CodeSetsDataset([{sets}], items={len(self)}, num_tokens={self.num_tokens})"


class TokenDataset(_AugmentedDataset):
    """In-memory image tokens: `codes` `[N, h*w]` (or `[N, n_aug, h*w]`) and class `labels` `[N]`.

    Tensors and NumPy arrays are accepted; items are `(LongTensor [h*w], LongTensor [])` as in
    :class:`CodesDataset`, with the same seeded augmentation choice when `n_aug > 1`.
    """

    def __init__(self, codes: Any, labels: Any, *, codebook_size: int | None = None,
                 num_classes: int | None = None, seed: int = 0, augment: bool = True):
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must hold integer token ids, got dtype {codes.dtype}")
        if codes.ndim == 2:
            codes = codes[:, None]
        elif codes.ndim == 3 and codes.shape[1] == codes.shape[2] > 1:  # ambiguous: say how it is read
            warnings.warn(f"codes of shape {tuple(codes.shape)} are read as [N, n_aug={codes.shape[1]}, "
                          f"{codes.shape[2]} tokens]; if they are [N, h, w] token grids, pass "
                          f"codes.reshape(len(codes), -1)", stacklevel=2)
        if codes.ndim != 3 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must have shape [N, h*w] or [N, n_aug, h*w] with N >= 1, got "
                             f"{tuple(codes.shape)}")
        if not _is_square(codes.shape[-1]):
            raise ValueError(f"codes: wrong grid size: {codes.shape[-1]} tokens per image is not a square grid")
        labels = labels.reshape(-1) if labels.ndim > 1 and labels.shape[-1] == 1 else labels
        if labels.ndim != 1 or labels.shape[0] != codes.shape[0]:
            raise ValueError(f"labels must have shape [{codes.shape[0]}] (one class id per item), got "
                             f"{tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
        _check_ids(codes.numpy() if codes.device.type == "cpu" else codes.cpu().numpy(), codebook_size, "codes")
        if labels.numel() and (int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes)):
            raise ValueError(f"labels: class ids must lie in [0, {num_classes if num_classes else '...'}), got "
                             f"min {int(labels.min())}, max {int(labels.max())}")
        self.codes = codes.long().cpu()
        self.labels = labels.long().cpu()
        self.num_tokens = self.codes.shape[-1]
        self.num_augmentations = self.codes.shape[1]
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        index %= len(self)
        aug = self._augmentation(index, self.num_augmentations)
        return self.codes[index, aug].clone(), self.labels[index].clone()
