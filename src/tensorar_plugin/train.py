"""Fine-tuning loop for a `TensorARWrapper`: one process, DDP under torchrun, or FSDP.

    from tensorar_plugin.train import TrainConfig, Trainer
    trainer = Trainer(wrapper, CodesDataset("codes/"), TrainConfig(max_steps=10_000, batch_size=256))
    trainer.train()          # `torchrun --nproc_per_node 8 script.py` runs the same code with DDP

Defaults follow LlamaGen's `train_c2i.py`: AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on
every parameter with two or more dimensions -- embeddings included -- and none on norms and
biases), gradient clipping at 1.0, bf16 autocast, optional EMA of the weights.

`batch_size` is the *global* batch of one optimizer step: it is split over `world_size` processes
and `grad_accum_steps` micro-steps, so changing the number of GPUs keeps the optimisation the same.
Each global batch is a contiguous slice of a seeded permutation of the dataset (one permutation per
epoch, like `DistributedSampler`); rank `r` takes every `world_size`-th item of it.

Checkpoints (`out_dir/checkpoint-<step>/`) hold the wrapper's weights written by `save_pretrained`
(safetensors), `ema/` (the EMA weights, when enabled) and the trainer state: optimizer tensors, EMA
tensors and RNG states in `trainer_state.safetensors`, everything else (step, scheduler, optimizer
hyper-parameters, configuration) in `trainer_state.json`. Nothing is pickled. Resuming restores
parameters, optimizer, scheduler, data position, the augmentation epoch and every RNG the step uses
(torch's global CPU/CUDA generators for dropout and label dropout, the noise generator), so a resumed
run continues bit-for-bit where the uninterrupted run would have been (same device and world size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import numbers
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checks import is_integer
from .files import read_json, read_safetensors
from .generation import check_cond_mask
from .state_dicts import describe_mismatch
from .wrapper import ADAPTER_NAME, CONFIG_NAME, WEIGHTS_NAME, TensorARWrapper

__all__ = [
    "TrainConfig",
    "Trainer",
    "GlobalBatchSampler",
    "TRAINER_STATE_NAME",
    "TRAINER_TENSORS_NAME",
    "METRICS_NAME",
    "find_latest_checkpoint",
    "previous_run_files",
    "init_distributed",
    "distributed_info",
]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINER_TENSORS_NAME = "trainer_state.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FORMAT_VERSION = 1
PRECISIONS = ("bf16", "no")
LR_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a fine-tuning run (defaults: LlamaGen's c2i recipe)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # on parameters with ndim >= 2 (matrices and embeddings), as LlamaGen
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 disables clipping
    warmup_steps: int = 0  # linear warm-up from 0 (LlamaGen uses none)
    lr_schedule: str = "constant"  # after warm-up: "constant" (LlamaGen) or "cosine" (down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global batch per optimizer step (all processes and accumulation steps together)
    grad_accum_steps: int = 1
    mixed_precision: str = "bf16"  # "bf16" autocast (where supported, CPU included) or "no" (float32)
    ema_decay: float | None = None  # e.g. 0.9999; None disables the EMA
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 1000  # steps between checkpoints; 0 saves only at the end
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints; None keeps all
    out_dir: str = "tensorar_finetune"
    seed: int = 0
    num_workers: int = 0  # data-loader worker processes per rank
    shuffle: bool = True
    device: str | None = None  # default: cuda:<LOCAL_RANK> when available, else cpu
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2 `fully_shard`)
    # compute the loss one window slot at a time and recompute the head's logits in the backward pass: the
    # [B, T, k, V] logits (k times the base model's) are never held, for one more forward of the head
    recompute_logits: bool = False
    # torch.compile the training forward (True, or a dict of torch.compile options); LlamaGen's trainer compiles
    # by default. Checkpoints, resume and the EMA are unaffected; the first steps are slow while it compiles
    compile: bool | dict[str, Any] = False
    save_backbone: bool | None = None  # passed to save_pretrained (None: not when the backbone is frozen)
    resume_from: str | None = None  # a checkpoint folder, or "latest" (newest in out_dir, if any)
    # an out_dir that holds an earlier run (metrics, checkpoints, final/) is refused unless resuming; True deletes
    # that run's files first (only those: metrics.jsonl, checkpoint-<step>/, final/)
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, stored with checkpoints

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        # numbers of any kind (numpy scalars too) become Python ints and floats: the config is saved as JSON
        for name in ("lr", "weight_decay", "min_lr_ratio", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "warmup_steps", "ckpt_every",
                     "num_workers", "keep_checkpoints"):
            value = getattr(self, name)
            if is_integer(value):
                setattr(self, name, int(value))
        for name in ("grad_clip", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, float(value))
        if self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0 disables it) or None, got {self.grad_clip!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "ckpt_every", "num_workers"):
            value = getattr(self, name)
            if not is_integer(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        keep = self.keep_checkpoints
        if keep is not None and (not is_integer(keep) or keep < 1):
            raise ValueError(f"keep_checkpoints must be an integer >= 1 or None, got {keep!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        for name in ("shuffle", "fsdp", "progress", "recompute_logits", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {self.compile!r}")
        if isinstance(self.compile, dict):
            if self.compile.get("fullgraph"):
                raise ValueError("compile={'fullgraph': True} cannot work: the noise draws take a torch.Generator, "
                                 "which dynamo keeps out of the graph")
            try:  # saved with every checkpoint
                json.dumps(self.compile)
            except (TypeError, ValueError) as err:
                raise ValueError(f"compile options must be JSON values (they are saved with the checkpoints; pass a "
                                 f"backend by name): {err}") from None
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must name a torch device (cpu, cuda, cuda:1, ...), got {self.device!r}: "
                                 f"{err}") from None
            self.device = str(self.device)
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir must be a path, got {self.out_dir!r}")
        self.out_dir = str(self.out_dir)
        if self.mixed_precision in ("fp32", "none", "float32"):
            self.mixed_precision = "no"
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay!r}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum_steps "
                             f"({self.grad_accum_steps})")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**data)


class _LRLambda:
    """Linear warm-up, then constant or cosine decay (a picklable, state-dict-friendly object)."""

    def __init__(self, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float):
        self.warmup_steps, self.max_steps, self.schedule, self.min_ratio = warmup_steps, max_steps, schedule, min_ratio

    def settings(self) -> dict[str, Any]:
        """The settings the factors depend on (a constant schedule ignores `max_steps` and `min_ratio`)."""
        used = {"warmup_steps": self.warmup_steps, "schedule": self.schedule}
        if self.schedule != "constant":
            used.update(max_steps=self.max_steps, min_ratio=self.min_ratio)
        return used

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.max_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


def init_distributed(device: str | None = None) -> bool:
    """Start the default process group from torchrun's environment; True if this call started it.

    Nothing happens when a group exists already or when ``WORLD_SIZE`` is unset or 1. The backend is
    NCCL for CUDA training and gloo otherwise (``device="cpu"`` or no GPU).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def distributed_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process; (0, 1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
    return 0, 1, 0


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor; a collective on every rank for DTensors."""
    return t.full_tensor() if _is_dtensor(t) else t


def _checkpoint_dirs(out_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The `checkpoint-<step>` folders under `out_dir` with their steps, in step order."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    return sorted((int(path.name[len(CHECKPOINT_PREFIX):]), path) for path in root.iterdir()
                  if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)
                  and path.name[len(CHECKPOINT_PREFIX):].isdigit())


def previous_run_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """What an earlier run left in `out_dir`: a non-empty metrics.jsonl, `checkpoint-<step>/` and `final/`."""
    root = Path(out_dir)
    metrics, final = root / METRICS_NAME, root / "final"
    found = [path for _, path in _checkpoint_dirs(root)]
    if final.is_dir():
        found.append(final)
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.insert(0, metrics)
    return found


def find_latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The `checkpoint-<step>` folder with the largest step under `out_dir` (complete ones only), or None."""
    complete = [path for _, path in _checkpoint_dirs(out_dir) if (path / TRAINER_STATE_NAME).is_file()]
    return complete[-1] if complete else None


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one epoch, starting at global batch `start_batch`.

    Epoch `e` orders the dataset by `randperm(len, seed + e)` (or in order without shuffling); global
    batch `b` is items `b * batch_size ... (b + 1) * batch_size - 1` of that order (incomplete batches
    are dropped); rank `r` takes every `world_size`-th of them starting at `r` and splits its share
    into `grad_accum_steps` consecutive micro-batches.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 grad_accum_steps: int = 1, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                 shuffle: bool = True):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("grad_accum_steps", grad_accum_steps, 1), ("dataset_len", dataset_len, 0)):
            if not is_integer(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not is_integer(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size - 1 = {world_size - 1}], got {rank!r}")
        dataset_len, batch_size, world_size, rank, grad_accum_steps = (
            int(v) for v in (dataset_len, batch_size, world_size, rank, grad_accum_steps))
        if batch_size % (world_size * grad_accum_steps):
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size x grad_accum_steps "
                             f"({world_size} x {grad_accum_steps})")
        if dataset_len < batch_size:
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch ({batch_size})")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.world_size, self.rank, self.grad_accum_steps = world_size, rank, grad_accum_steps
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle
        self.micro_batch = batch_size // (world_size * grad_accum_steps)

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_len // self.batch_size

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        return torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.start_batch, self.batches_per_epoch):
            mine = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            for a in range(self.grad_accum_steps):
                yield mine[a * self.micro_batch:(a + 1) * self.micro_batch].tolist()

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0) * self.grad_accum_steps


def _collate(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(codes, cond)` items, or `(codes, cond, cond_mask)` for text conditions padded to one length."""
    sizes = {len(item) for item in batch}
    if len(sizes) != 1 or not sizes <= {2, 3}:
        raise ValueError(f"dataset items must be (codes, condition) or (codes, condition, condition_mask); got "
                         f"items of {sorted(sizes)} elements")
    collated = torch.utils.data.default_collate(batch)
    return collated[0], collated[1], (collated[2] if len(collated) == 3 else None)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train a `TensorARWrapper` on a map-style dataset of `(codes [T], condition)` items.

    Args:
        wrapper: the model; moved to the training device (and sharded in place with `fsdp=True`).
        dataset: e.g. `CodesDataset` / `TokenDataset`; items are `(LongTensor [T], label)`, or for text
            conditions `(codes, caption features [L, D])` or `(codes, features, mask [L])` when captions
            are padded (the mask reaches the model as `cond_mask`). A `set_epoch(epoch)` method, if
            present, is called at every epoch start.
        config: a `TrainConfig` (defaults if None).
        device: overrides `config.device`.

    Under `torchrun` (or any initialised process group) the model is wrapped with
    DistributedDataParallel, or sharded with FSDP2 when `config.fsdp`; only rank 0 logs, shows
    progress and writes files; every rank reads checkpoints when resuming.
    """

    def __init__(self, wrapper: TensorARWrapper, dataset: Dataset, config: TrainConfig | None = None, *,
                 device: str | torch.device | None = None):
        if not isinstance(wrapper, TensorARWrapper):
            raise TypeError(f"wrapper must be a TensorARWrapper, got {type(wrapper).__name__}")
        self.config = cfg = config if config is not None else TrainConfig()
        if device is not None:
            cfg.device = str(device)
        self.wrapper = wrapper
        self.dataset = dataset
        self._owns_process_group = init_distributed(cfg.device)
        self.rank, self.world_size, self.local_rank = distributed_info()
        self.is_main = self.rank == 0
        self.device = self._pick_device(cfg.device)
        if cfg.batch_size % (self.world_size * cfg.grad_accum_steps):
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by world_size x grad_accum_steps "
                             f"({self.world_size} x {cfg.grad_accum_steps})")
        self.dataset_len = len(dataset)  # type: ignore[arg-type]
        if self.dataset_len < cfg.batch_size:
            raise ValueError(f"the dataset has {self.dataset_len} items, fewer than one global batch "
                             f"(batch_size={cfg.batch_size})")
        self.batches_per_epoch = self.dataset_len // cfg.batch_size
        self.out_dir = Path(cfg.out_dir)
        earlier_run = self._claim_out_dir()  # refused here, before any work; deleted at the end, once all is well
        self.autocast_dtype = self._pick_precision()

        # LlamaGen seeds each rank differently (dropout and label dropout differ across ranks).
        torch.manual_seed(cfg.seed * self.world_size + self.rank)
        self.model = self._prepare_model()
        #: what a training step calls: the (DDP/FSDP) model, compiled when asked; state dicts keep using `model`
        self.forward_model = self.model
        if cfg.compile:
            self.forward_model = torch.compile(self.model, **(cfg.compile if isinstance(cfg.compile, dict) else {}))
        self.param_names = [n for n, p in wrapper.named_parameters() if p.requires_grad]
        if not self.param_names:
            raise ValueError("the wrapper has no trainable parameters")
        if cfg.save_backbone is False and any(p.requires_grad for p in wrapper.base_model.parameters()):
            raise ValueError("save_backbone=False, but the backbone is trained: its checkpoints and final weights "
                             "would lose the backbone's updates; freeze it (freeze_backbone=True) or save it")
        params = dict(wrapper.named_parameters())
        decay = [n for n in self.param_names if params[n].ndim >= 2]
        no_decay = [n for n in self.param_names if params[n].ndim < 2]
        self._group_names = [decay, no_decay]
        fused = {"fused": True} if self.device.type == "cuda" and not cfg.fsdp else {}
        self.optimizer = torch.optim.AdamW(
            [{"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _LRLambda(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio))
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema_decay is not None:
            self.ema = {n: params[n].detach().float().clone() for n in self.param_names}
        noise_seed = (cfg.seed * self.world_size + self.rank) * 0x9E3779B1 + 0x5DEECE66D
        self.noise_generator = torch.Generator(device=self.device).manual_seed(noise_seed % (2**63))
        self.step = 0
        self.last_metrics: dict[str, Any] = {}
        self._last_saved_step: int | None = None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log(f"training {sum(params[n].numel() for n in self.param_names):,} parameters "
                      f"({len(decay)} tensors with weight decay, {len(no_decay)} without) on {self.device}, "
                      f"world size {self.world_size}{', FSDP' if cfg.fsdp else ''}")
        self._delete_earlier_run(earlier_run)
        if cfg.resume_from:
            self.resume(cfg.resume_from)

    # -- setup -----------------------------------------------------------------------------------
    def _resumes_in_out_dir(self) -> bool:
        resume = self.config.resume_from
        return bool(resume) and (str(resume) == "latest"
                                 or Path(resume).resolve().parent == self.out_dir.resolve())

    def _blocking_files(self) -> list[Path]:
        """What an earlier run left in `out_dir` that this one would mix with or replace."""
        resume = self.config.resume_from
        if not resume:
            return previous_run_files(self.out_dir)
        if str(resume) == "latest":
            if find_latest_checkpoint(self.out_dir) is not None:
                return []
            final = self.out_dir / "final"  # a finished run with nothing to resume; a run that stopped before
            return [final] if final.is_dir() else []  # its first checkpoint simply starts again
        return [] if self._resumes_in_out_dir() else previous_run_files(self.out_dir)

    def _claim_out_dir(self) -> list[Path]:
        """Refuse to start a run over an earlier one (its metrics would mix with ours and its checkpoints and
        final/ be replaced one by one) unless resuming it or told to overwrite it. Returns the files that
        `overwrite=True` deletes, once every other check has passed (`_delete_earlier_run`)."""
        cfg = self.config
        if cfg.overwrite and self._resumes_in_out_dir():
            raise ValueError("overwrite=True would delete the run that resume_from continues: pass one of them")
        found = [self._blocking_files() if self.is_main else []]
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        if not found[0] or cfg.overwrite:
            return found[0]
        listed = ", ".join(path.name + ("/" if path.is_dir() else "") for path in found[0][:4])
        listed += f" and {len(found[0]) - 4} more" if len(found[0]) > 4 else ""
        if str(cfg.resume_from) == "latest":
            raise FileExistsError(f"out_dir {self.out_dir} holds a finished run ({listed}) but no checkpoint to "
                                  f"resume from: choose another out_dir (--out), or start again with "
                                  f"overwrite=True (--overwrite, without --resume), which deletes it")
        raise FileExistsError(
            f"out_dir {self.out_dir} holds an earlier run ({listed}): continue it with resume_from='latest' "
            f"(tensorar finetune --resume latest), choose another out_dir (--out), or start again with "
            f"overwrite=True (--overwrite), which deletes these files")

    def _delete_earlier_run(self, files: list[Path]) -> None:
        """`overwrite=True`: delete the earlier run's files (rank 0; every rank learns whether that worked)."""
        failure = [None]
        if self.is_main and files:
            try:
                for path in files:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                self._log(f"overwrite: deleted the earlier run's files in {self.out_dir}")
            except OSError as err:
                failure[0] = f"overwrite: could not delete the earlier run in {self.out_dir}: {err}"
        if self.world_size > 1:
            dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise OSError(failure[0])

    def _pick_device(self, requested: str | None) -> torch.device:
        if requested is not None:
            device = torch.device(requested)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {requested!r}, but torch sees no CUDA GPU here")
            if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device {requested!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", self.local_rank)
        elif torch.cuda.is_available():
            device = torch.device("cuda", self.local_rank)
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _pick_precision(self) -> torch.dtype | None:
        if self.config.mixed_precision == "no":
            return None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            warnings.warn("this GPU does not support bf16; training in float32", stacklevel=3)
            return None
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                pass
        except RuntimeError:  # pragma: no cover - device without bf16 autocast
            warnings.warn(f"no bf16 autocast on {self.device.type}; training in float32", stacklevel=3)
            return None
        return torch.bfloat16

    def _prepare_model(self) -> nn.Module:
        wrapper, cfg = self.wrapper, self.config
        low = [n for n, p in wrapper.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            warnings.warn(f"{len(low)} trainable parameters are not float32 (e.g. {low[0]}); LlamaGen trains "
                          "float32 weights under bf16 autocast (mixed_precision='bf16')", stacklevel=3)
        if cfg.fsdp:
            return self._shard(wrapper)
        wrapper.to(self.device)
        if self.world_size == 1:
            return wrapper
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (rotary tables, slot weights) never change, and the one that does (the adaptive schedule's
        # draft accuracy) is all-reduced by `update_draft_accuracy`: no need to sync them every forward
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(wrapper, device_ids=device_ids, **no_sync)

    def _shard(self, wrapper: TensorARWrapper) -> nn.Module:
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # pragma: no cover - torch < 2.6
            raise RuntimeError("fsdp=True needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from exc
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("fsdp=True needs a process group: launch with torchrun (or call "
                             "torch.distributed.init_process_group first)")
        # every rank must shard the same weights: take rank 0's (new parts are initialised randomly)
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        with torch.no_grad():
            for tensor in (*wrapper.parameters(), *wrapper.buffers()):
                buffer = tensor.detach().to(comm)
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        base = wrapper.base_model
        if hasattr(base, "get_fsdp_wrap_module_list"):
            units = list(base.get_fsdp_wrap_module_list())
        else:
            units = list(getattr(base, "layers", []))
        # The TensorAR parts (a few percent of the weights) stay in the root unit.
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(wrapper, mesh=mesh)  # root: embeddings, norm, head, new parts (moves all to the device)
        return wrapper

    def _log(self, message: str) -> None:
        if self.is_main:
            logger.info(message)

    # -- data --------------------------------------------------------------------------------------
    def _sampler(self, epoch: int, start_batch: int) -> GlobalBatchSampler:
        cfg = self.config
        return GlobalBatchSampler(self.dataset_len, cfg.batch_size, world_size=self.world_size, rank=self.rank,
                                  grad_accum_steps=cfg.grad_accum_steps, seed=cfg.seed, epoch=epoch,
                                  start_batch=start_batch, shuffle=cfg.shuffle)

    def _micro_batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """This rank's micro-batches from optimizer step `start_step` on, across epochs, forever."""
        cfg = self.config
        epoch, start_batch = divmod(start_step, self.batches_per_epoch)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            # a private generator: creating the loader must not consume the global RNG
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * self.world_size + self.rank)
            loader = DataLoader(self.dataset, batch_sampler=self._sampler(epoch, start_batch),
                                num_workers=cfg.num_workers, collate_fn=_collate, generator=gen,
                                pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, start_batch = epoch + 1, 0

    # -- one optimizer step ----------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _sync_context(self, sync: bool):
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            return contextlib.nullcontext()
        if not sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _train_step(self, batches: Iterator[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        cfg = self.config
        accum = cfg.grad_accum_steps
        loss_sum = slot_sum = None
        tokens = 0
        for micro in range(accum):
            codes, cond, cond_mask = next(batches)
            codes = codes.reshape(codes.shape[0], -1)
            if self.wrapper.adapter.num_classes is not None and cond.dim() == 2 and cond.shape[1] == 1:
                cond = cond[:, 0]  # labels stored as [1] arrays per item (LlamaGen's layout)
            if codes.device.type == "cpu" and cond.device.type == "cpu":  # checked before the copy: no device sync
                self._check_batch(codes, cond, cond_mask)
            codes = codes.to(self.device, non_blocking=True)
            cond = cond.to(self.device, non_blocking=True)
            if cond_mask is not None:
                cond_mask = cond_mask.to(self.device, non_blocking=True)
            with self._sync_context(micro == accum - 1):
                with self._autocast():
                    out = self.forward_model(codes, cond, generator=self.noise_generator, validate=False,
                                             return_logits=not cfg.recompute_logits, cond_mask=cond_mask)
                loss, slots = out.loss, out.slot_losses.detach().float()
                del out  # the logits (if any) are not needed for the backward pass: free them first
                (loss / accum).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            slot_sum = slots if slot_sum is None else slot_sum + slots
            tokens += codes.numel()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, max_norm)).detach().float()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.wrapper.update_draft_accuracy()  # `adaptive` noise: one update per step, equal on every rank
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return {"loss": loss_sum / accum, "slot_losses": slot_sum / accum, "grad_norm": grad_norm,
                "lr": float(lr), "tokens": tokens}

    def _check_batch(self, codes: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> None:
        """Token ids, conditions and condition masks of a (CPU) batch, with errors that name the data rather
        than an index error inside the embedding (a device-side assert on CUDA)."""
        try:
            self.wrapper.adapter.check_condition(cond, codes.shape[0])
            self.wrapper._check_tokens(codes)
            classes = self.wrapper.adapter.num_classes
            if classes is not None and cond.numel() and int(cond.max()) >= classes:
                raise ValueError(f"labels must lie in [0, {classes - 1}], got {int(cond.max())} (id {classes} is "
                                 f"the null class that label dropout uses; were the labels 1-based?)")
            if cond_mask is not None:
                if classes is not None:
                    raise ValueError("items have a third element, taken as a condition mask, but this model is "
                                     "class-conditional (masks are for padded text conditions): return (codes, label)")
                check_cond_mask(cond_mask, self.wrapper.adapter, codes.shape[0], guided=False)
        except ValueError as error:
            raise ValueError(f"the training data does not fit the model: {error}") from None

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        params = dict(self.wrapper.named_parameters())
        for name, shadow in self.ema.items():  # type: ignore[union-attr]
            shadow.mul_(decay).add_(params[name].detach().float(), alpha=1 - decay)

    # -- the loop --------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to `config.max_steps`, saving checkpoints and `out_dir/final`; return the last metrics.

        `until_step` stops earlier (e.g. to sample between chunks in a notebook; a later `train()`
        continues): the learning-rate schedule still spans `max_steps`, and `final` is only written
        once `max_steps` is reached.
        """
        from tqdm import tqdm

        cfg = self.config
        if until_step is not None and (not is_integer(until_step) or until_step < 0):
            raise ValueError(f"until_step must be an integer >= 0 (a step to stop at) or None, got {until_step!r}")
        stop = cfg.max_steps if until_step is None else min(int(until_step), cfg.max_steps)
        if self.is_main:
            (self.out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if self.step >= stop:
            self._log(f"already at step {self.step}; nothing to train (stop at {stop})")
            if self.step >= cfg.max_steps and not self._final_written():
                self.save_final()  # the run ended after its last checkpoint but before writing final/
            return self.last_metrics
        self.wrapper.train()
        deferred, self.wrapper.defer_draft_accuracy = self.wrapper.defer_draft_accuracy, True  # see _train_step
        batches = self._micro_batches(self.step)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="fine-tuning", unit="step",
                   disable=not (self.is_main and cfg.progress), dynamic_ncols=True)
        window: dict[str, Any] = {}
        window_start = time.perf_counter()
        try:
            while self.step < stop:
                stats = self._train_step(batches)
                for key, value in stats.items():
                    window[key] = window[key] + value if key in window else value
                window["steps"] = window.get("steps", 0) + 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == stop:
                    metrics = self._reduce_metrics(window, time.perf_counter() - window_start)
                    self._write_metrics(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    window, window_start = {}, time.perf_counter()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            batches.close()
            self.wrapper.defer_draft_accuracy = deferred
        if self.step >= cfg.max_steps:
            if cfg.ckpt_every and self._last_saved_step != self.step:
                self.save_checkpoint()
            self.save_final()
        return self.last_metrics

    def _reduce_metrics(self, window: dict[str, Any], elapsed: float) -> dict[str, Any]:
        steps = window["steps"]
        packed = torch.cat([window["loss"].reshape(1), window["slot_losses"].reshape(-1)]).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(packed)
            packed /= self.world_size
        packed = (packed / steps).tolist()
        tokens = int(window["tokens"]) * self.world_size
        metrics = {
            "step": self.step,
            "epoch": self.step // self.batches_per_epoch,
            "loss": packed[0],
            "slot_losses": packed[1:],
            "lr": float(window["lr"]) / steps,
            "grad_norm": float(window["grad_norm"]) / steps,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "samples_per_s": steps * self.config.batch_size / max(elapsed, 1e-9),
        }
        self.last_metrics = metrics
        return metrics

    def _write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    # -- saving ----------------------------------------------------------------------------------
    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        """Full CPU state dict on rank 0 under FSDP (None elsewhere); None without FSDP (use the wrapper)."""
        if not self.config.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None

    def _named_optimizer_state(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name: `{"state": {name: {...}}, "param_groups": [...]}`."""
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        raw = self.optimizer.state_dict()
        names = [n for group in self._group_names for n in group]
        groups = []
        for group in raw["param_groups"]:
            groups.append({**group, "params": [names[i] for i in group["params"]]})
        return {"state": {names[i]: value for i, value in raw["state"].items()}, "param_groups": groups}

    def _gather_rng(self) -> list[dict[str, torch.Tensor]]:
        local = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state()}
        if self.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return [local]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        return gathered

    def _ema_state(self, full_state: dict[str, torch.Tensor] | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(full model state with the EMA values in place of the trainable parameters, the EMA tensors) on rank 0."""
        shadows = {name: _full(shadow) for name, shadow in self.ema.items()}  # type: ignore[union-attr]
        if not self.is_main:
            return None
        base = full_state if full_state is not None else self.wrapper.state_dict()
        state = {k: v.detach().cpu() for k, v in base.items()}
        for name, shadow in shadows.items():
            state[name] = shadow.detach().to("cpu", state[name].dtype)
        return state, shadows

    def _save_weights(self, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
        self.wrapper.save_pretrained(directory, save_backbone=self.config.save_backbone, state_dict=state)

    def save_checkpoint(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write weights + trainer state to `directory` (default `out_dir/checkpoint-<step>`).

        A collective under DDP / FSDP: call it on every rank; rank 0 writes.
        """
        cfg = self.config
        target = Path(directory) if directory is not None else self.out_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        full_state = self._full_model_state()
        optim = self._named_optimizer_state()
        rng = self._gather_rng()
        ema = self._ema_state(full_state) if self.ema is not None else None
        if self.is_main:
            tmp = target.with_name(f".{target.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            self._save_weights(tmp, full_state)
            tensors: dict[str, torch.Tensor] = {}
            extra_state: dict[str, dict[str, Any]] = {}
            for name, values in optim["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer/{name}/{key}"] = value.detach().cpu()
                    else:
                        extra_state.setdefault(name, {})[key] = value
            if ema is not None:
                ema_full, shadows = ema
                self._save_weights(tmp / "ema", ema_full)
                tensors.update({f"ema/{name}": value.detach().cpu() for name, value in shadows.items()})
            for rank, states in enumerate(rng):
                tensors.update({f"rng/{rank}/{key}": value.cpu() for key, value in states.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TRAINER_TENSORS_NAME))
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                      for g in optim["param_groups"]]
            state = {
                "format_version": STATE_FORMAT_VERSION,
                "step": self.step,
                "epoch": self.step // self.batches_per_epoch,
                "batch_in_epoch": self.step % self.batches_per_epoch,
                "batches_per_epoch": self.batches_per_epoch,
                "dataset_len": self.dataset_len,
                "world_size": self.world_size,
                "device_type": self.device.type,
                "scheduler": self.scheduler.state_dict(),
                "optimizer": {"param_groups": groups, "extra_state": extra_state},
                "config": cfg.to_dict(),
                "metrics": self.last_metrics,
            }
            (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            self._log(f"saved checkpoint {target}")
            if directory is None:
                self._prune_checkpoints()
        self._last_saved_step = self.step
        if self.world_size > 1:
            dist.barrier()
        return target

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep is None:
            return
        for _, path in _checkpoint_dirs(self.out_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def _final_written(self) -> bool:
        """Whether `out_dir/final` holds a saved model (rank 0 looks; every rank gets its answer)."""
        written = [(self.out_dir / "final" / CONFIG_NAME).is_file()]
        if self.world_size > 1:
            dist.broadcast_object_list(written, src=0)
        return bool(written[0])

    def save_final(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write the trained weights (and `ema/`) with `save_pretrained` to `directory` (default `out_dir/final`)."""
        target = Path(directory) if directory is not None else self.out_dir / "final"
        full_state = self._full_model_state()
        ema = self._ema_state(full_state) if self.ema is not None else None
        if self.is_main:
            self._save_weights(target, full_state)
            if ema is not None:
                self._save_weights(target / "ema", ema[0])
            self._log(f"saved the fine-tuned model to {target}")
        if self.world_size > 1:
            dist.barrier()
        return target

    # -- resuming --------------------------------------------------------------------------------
    def resume(self, path: str | os.PathLike[str]) -> Path | None:
        """Restore weights, optimizer, scheduler, EMA, step, data position and RNG states from a checkpoint.

        `path` is a `checkpoint-<step>` folder, or "latest" for the newest one in `out_dir` (None is
        returned, and training starts from scratch, when there is none). Every rank reads the files.
        """
        if str(path) == "latest":
            found = find_latest_checkpoint(self.out_dir)
            if found is None:
                self._log(f"no checkpoint in {self.out_dir}; starting from scratch")
                if self.is_main:  # metrics of a run that stopped before its first checkpoint
                    self._truncate_metrics()
                return None
            path = found
        directory = Path(path)
        state_path = directory / TRAINER_STATE_NAME
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path} not found: is {directory} a checkpoint written by Trainer?")
        state = read_json(state_path)
        if state.get("format_version", 0) > STATE_FORMAT_VERSION:
            raise ValueError(f"{state_path} has format_version {state['format_version']}; upgrade tensorar-plugin")
        tensors = read_safetensors(directory / TRAINER_TENSORS_NAME)
        self._load_weights(directory)
        self._load_optimizer(state, tensors, state_path)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_requested_hyperparameters(directory)
        if self.ema is not None:
            self._load_ema(tensors, directory)
        self._load_rng(state, tensors)
        self.step = int(state["step"])
        self._last_saved_step = self.step
        self.last_metrics = state.get("metrics", {})
        if (state.get("dataset_len"), state.get("batches_per_epoch")) != (self.dataset_len, self.batches_per_epoch):
            warnings.warn(f"the dataset or batch size changed since {directory} was saved "
                          f"({state.get('dataset_len')} items / {state.get('batches_per_epoch')} batches per epoch "
                          f"then, {self.dataset_len} / {self.batches_per_epoch} now): the data order differs from "
                          f"the original run", stacklevel=2)
        self._warn_on_changed_extra(state.get("config", {}).get("extra"), directory)
        if self.is_main:
            self._truncate_metrics()
        self._log(f"resumed from {directory} at step {self.step}")
        return directory

    def _warn_on_changed_extra(self, saved: dict[str, Any] | None, directory: Path) -> None:
        """`TrainConfig.extra` records what the caller trains on (`tensorar finetune`: model, codes, window):
        a resume where it differs continues on other data or settings, which is allowed but should not pass
        unnoticed."""
        if saved is None:
            return
        now = json.loads(json.dumps(self.config.extra, default=str))  # as it would be saved
        changes = [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
                   if saved.get(key) != now.get(key)]
        if changes:
            warnings.warn(f"{directory} was saved by a run with other settings than this one: {', '.join(changes)}; "
                          f"continuing with this run's", stacklevel=3)

    def _apply_requested_hyperparameters(self, directory: Path) -> None:
        """Loading the optimizer and scheduler brings back the checkpoint's learning rate, schedule and
        AdamW settings. Where this run's config asks for others (extending a cosine run to more steps,
        say) the config wins, with a warning: the run then no longer continues the original exactly."""
        cfg = self.config
        requested = _LRLambda(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio)
        saved = self.scheduler.lr_lambdas[0]
        changes = [f"{key} {getattr(saved, key, None)!r} -> {value!r}" for key, value in requested.settings().items()
                   if getattr(saved, key, None) != value]
        if self.scheduler.base_lrs[0] != cfg.lr:
            changes.append(f"lr {self.scheduler.base_lrs[0]!r} -> {cfg.lr!r}")
        decays = (cfg.weight_decay, 0.0)
        for group, decay in zip(self.optimizer.param_groups, decays, strict=True):
            wanted = {"weight_decay": decay, "betas": tuple(cfg.betas), "eps": cfg.eps}
            for key, value in wanted.items():
                current = tuple(group[key]) if key == "betas" else group[key]
                if current != value:
                    changes.append(f"{key} {current!r} -> {value!r}")
                group[key] = value
        self.scheduler.lr_lambdas = [requested] * len(self.optimizer.param_groups)  # same factors if unchanged
        if not changes:
            return
        warnings.warn(f"{directory} was trained with other optimizer settings; continuing with this run's: "
                      f"{', '.join(dict.fromkeys(changes))}", stacklevel=3)
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        factor = requested(self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _load_weights(self, directory: Path) -> None:
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found in checkpoint {directory}")
        saved = read_json(config_path)
        if saved.get("window") != self.wrapper.window:
            raise ValueError(f"{directory} was saved with window={saved.get('window')}, but the wrapper has "
                             f"window={self.wrapper.window}")
        full, partial = directory / WEIGHTS_NAME, directory / ADAPTER_NAME
        if full.is_file():
            weights, strict = read_safetensors(full), True
        elif partial.is_file():
            weights, strict = read_safetensors(partial), False
        else:
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {ADAPTER_NAME}")
        expected = self.wrapper.state_dict() if strict else self.wrapper.tensorar_state_dict()
        report = describe_mismatch(expected, weights)  # DTensors report their global shapes, as saved
        if report is not None:
            raise ValueError(f"checkpoint {directory} does not fit this model (was it saved from another base "
                             f"model or other TensorAR settings?): {report}")
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))
            return
        if strict:
            self.wrapper.load_state_dict(weights, strict=True)
            return
        for name, module in self.wrapper.new_modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                                   strict=True)

    def _load_optimizer(self, state: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> None:
        named: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, name, slot = key.split("/", 2)
                named.setdefault(name, {})[slot] = value
        for name, values in state["optimizer"].get("extra_state", {}).items():
            named.setdefault(name, {}).update(values)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g)
                  for g in state["optimizer"]["param_groups"]]
        saved_names = [list(g["params"]) for g in groups]
        if [sorted(n) for n in saved_names] != [sorted(n) for n in self._group_names]:
            raise ValueError(f"{source}: the checkpoint's optimizer covers other parameters than this run trains "
                             f"(was the backbone frozen differently?)")
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, {"state": named, "param_groups": groups},
                                     options=StateDictOptions(full_state_dict=True))
            return
        ids = {name: i for i, name in enumerate(n for group in self._group_names for n in group)}
        raw = {"state": {ids[name]: values for name, values in named.items()},
               "param_groups": [{**g, "params": [ids[n] for n in names]} for g, names in zip(groups, self._group_names,
                                                                                              strict=True)]}
        self.optimizer.load_state_dict(raw)

    @torch.no_grad()
    def _load_ema(self, tensors: dict[str, torch.Tensor], directory: Path) -> None:
        missing = [name for name in self.ema if f"ema/{name}" not in tensors]  # type: ignore[union-attr]
        if missing:
            warnings.warn(f"{directory} has no EMA for {len(missing)} parameters (e.g. {missing[0]}); their EMA "
                          "restarts from the current weights", stacklevel=3)
        for name, shadow in self.ema.items():  # type: ignore[union-attr]
            key = f"ema/{name}"
            if key not in tensors:
                continue
            value = tensors[key].to(shadow.device if not _is_dtensor(shadow) else self.device, shadow.dtype)
            if _is_dtensor(shadow):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, shadow.device_mesh, shadow.placements, src_data_rank=None)
            shadow.copy_(value)

    def _load_rng(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"rng/{self.rank}/"
        saved_device = state.get("device_type", self.device.type)
        if state.get("world_size") != self.world_size or f"{prefix}torch" not in tensors:
            reason = f"written by {state.get('world_size')} processes, this run has {self.world_size}"
        elif saved_device != self.device.type:  # generator states of one device type do not fit another
            reason = f"written on {saved_device}, this run is on {self.device.type}"
        else:
            reason = None
        if reason is not None:
            warnings.warn(f"the checkpoint was {reason}: random streams are re-seeded, so dropout and noise differ "
                          "from the original run", stacklevel=3)
            torch.manual_seed((self.config.seed + int(state["step"])) * self.world_size + self.rank)
            self.noise_generator.manual_seed((self.config.seed + int(state["step"])) * 7919 + self.rank)
            return
        torch.set_rng_state(tensors[f"{prefix}torch"])
        self.noise_generator.set_state(tensors[f"{prefix}noise"])
        if self.device.type == "cuda" and f"{prefix}cuda" in tensors:
            torch.cuda.set_rng_state(tensors[f"{prefix}cuda"], self.device)

    def _truncate_metrics(self) -> None:
        """Drop metrics lines past the resumed step (they belong to the abandoned continuation)."""
        path = self.out_dir / METRICS_NAME
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(f"{line}\n" for line in kept))

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy the process group if this trainer started it (after training under torchrun)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False
