"""Find, download and load LlamaGen's released checkpoints into this package's models.

LlamaGen (FoundationVision) publishes class-conditional GPTs and VQ tokenizers in the Hugging Face
repo ``FoundationVision/LlamaGen`` and text-conditional ones in ``peizesun/llamagen_t2i``. This
module knows those files (:data:`LLAMAGEN_CHECKPOINTS`), fetches them through the Hugging Face
cache, reads them safely and loads them, with ``strict=True``, into
:class:`~tensorar_plugin.models.llamagen.LlamaGen` and :class:`~tensorar_plugin.models.vq.VQModel`::

    gpt = load_llamagen("c2i_L_384", device="cuda", dtype=torch.bfloat16)
    vq = load_vq(gpt.hub_info.vq, device="cuda")
    gpt.hub_info.token_grid, gpt.hub_info.cfg_scale   # (24, 2.0)

A local file works as well as a registry name (``load_llamagen("ckpts/my_run.pt")``); files named
like a released checkpoint get that checkpoint's registry entry, other files have their
configuration inferred from the weights (see :func:`infer_llamagen_config` and
:func:`infer_vq_config`).

Safety: checkpoints are always read with ``torch.load(..., weights_only=True)`` (or from
``.safetensors``), so a file can never run code while it is read. The only class allowed besides
tensors and plain containers is :class:`argparse.Namespace`, a data-only attribute bag that
LlamaGen's training scripts store under ``"args"``.

Memory: models are built on the ``meta`` device and the checkpoint tensors are assigned in place
(``load_state_dict(assign=True)``), so loading needs one copy of the weights, not two, and skips
the random initialisation.

Sampling defaults recorded in the registry come from LlamaGen's documentation: classifier-free
guidance 2.0 (B, L), 1.75 (XL, XXL), 1.65 (3B) for class-conditional models and 7.5 for
text-conditional ones; ``top_k`` is the demo value (2000 for c2i, 1000 for t2i) -- LlamaGen's FID
numbers are computed with ``top_k=0`` (no truncation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorar_plugin.files import read_safetensors, unreadable_file
from tensorar_plugin.models.llamagen import (
    LLAMAGEN_PRESETS,
    LlamaGen,
    LlamaGenConfig,
    build_llamagen,
    precompute_freqs_cis_2d,
)
from tensorar_plugin.models.vq import VQ_MODELS, VQConfig, VQModel, build_vq
from tensorar_plugin.state_dicts import describe_mismatch, first_items

__all__ = [
    "CheckpointInfo",
    "LLAMAGEN_CHECKPOINTS",
    "list_checkpoints",
    "checkpoint_info",
    "build_from_info",
    "load_state_dict_file",
    "resolve_checkpoint",
    "infer_llamagen_config",
    "infer_vq_config",
    "load_llamagen",
    "load_vq",
]

C2I_REPO = "FoundationVision/LlamaGen"
T2I_REPO = "peizesun/llamagen_t2i"

_KINDS = ("gpt", "vq")
#: Image size assumed for a GPT file that is neither in the registry nor given an ``image_size``.
DEFAULT_IMAGE_SIZE = 256
#: Pixels per token side assumed for a GPT file that is not in the registry.
DEFAULT_DOWNSAMPLE = 16
#: Condition-token count of LlamaGen's text-conditional GPTs (T5 feature length).
T2I_CLS_TOKEN_NUM = 120


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a released LlamaGen checkpoint lives and how to build the model it fits.

    GPT entries describe the token grid (``image_size // downsample`` per side), the condition
    (``model_type``, ``num_classes``, ``cls_token_num``, ``caption_dim``), the token vocabulary
    (``codebook_size``, equal to the paired tokenizer's codebook), the recommended guidance scale
    and the tokenizer to decode with (``vq``). VQ entries leave the GPT-only fields as None; their
    ``image_size`` is the training resolution (the tokenizer itself is fully convolutional).
    """

    name: str
    repo_id: str
    filename: str
    kind: str
    preset: str
    image_size: int
    downsample: int = 16
    num_classes: int | None = None
    cls_token_num: int | None = None
    model_type: str | None = None
    caption_dim: int | None = None
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    cfg_scale: float | None = None
    top_k: int | None = None
    vq: str | None = None

    @property
    def token_grid(self) -> int:
        """Tokens per image side: ``image_size // downsample``."""
        return self.image_size // self.downsample

    @property
    def block_size(self) -> int:
        """Image tokens per sample (``token_grid ** 2``), LlamaGen's ``block_size``."""
        return self.token_grid**2


def _c2i(name: str, preset: str, image_size: int, cfg_scale: float) -> CheckpointInfo:
    """Registry entry of a class-conditional ImageNet GPT (ds16 tokens, 1000 classes)."""
    return CheckpointInfo(
        name=name, repo_id=C2I_REPO, filename=f"{name}.pt", kind="gpt", preset=preset,
        image_size=image_size, num_classes=1000, cls_token_num=1, model_type="c2i",
        cfg_scale=cfg_scale, top_k=2000, vq="vq_ds16_c2i",
    )


def _t2i(name: str, image_size: int) -> CheckpointInfo:
    """Registry entry of a text-conditional GPT-XL (120 T5 tokens of width 2048)."""
    return CheckpointInfo(
        name=name, repo_id=T2I_REPO, filename=f"{name}.pt", kind="gpt", preset="GPT-XL",
        image_size=image_size, num_classes=1000, cls_token_num=T2I_CLS_TOKEN_NUM, model_type="t2i",
        caption_dim=2048, cfg_scale=7.5, top_k=1000, vq="vq_ds16_t2i",
    )


def _vq(name: str, repo_id: str, preset: str, downsample: int) -> CheckpointInfo:
    """Registry entry of a VQ tokenizer (16384 codes of dimension 8, trained at 256 px)."""
    return CheckpointInfo(
        name=name, repo_id=repo_id, filename=f"{name}.pt", kind="vq", preset=preset,
        image_size=256, downsample=downsample,
    )


#: Released LlamaGen checkpoints by short name (the file name without ``.pt``).
LLAMAGEN_CHECKPOINTS: dict[str, CheckpointInfo] = {
    info.name: info
    for info in (
        _c2i("c2i_B_256", "GPT-B", 256, 2.0),
        _c2i("c2i_B_384", "GPT-B", 384, 2.0),
        _c2i("c2i_L_256", "GPT-L", 256, 2.0),
        _c2i("c2i_L_384", "GPT-L", 384, 2.0),
        _c2i("c2i_XL_384", "GPT-XL", 384, 1.75),
        _c2i("c2i_XXL_384", "GPT-XXL", 384, 1.75),
        _c2i("c2i_3B_384", "GPT-3B", 384, 1.65),
        _vq("vq_ds16_c2i", C2I_REPO, "VQ-16", 16),
        _vq("vq_ds8_c2i", C2I_REPO, "VQ-8", 8),
        _t2i("t2i_XL_stage1_256", 256),
        _t2i("t2i_XL_stage2_512", 512),
        _vq("vq_ds16_t2i", T2I_REPO, "VQ-16", 16),
    )
}


def _check_kind(kind: str | None, *, optional: bool = False) -> None:
    """Raise ValueError unless ``kind`` is "gpt" or "vq" (or None when ``optional``)."""
    if kind is None and optional:
        return
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'gpt' or 'vq', got {kind!r}")


def list_checkpoints(kind: str | None = None) -> list[str]:
    """Names of the registered checkpoints, optionally only those of ``kind`` ("gpt" or "vq")."""
    _check_kind(kind, optional=True)
    return [name for name, info in LLAMAGEN_CHECKPOINTS.items() if kind is None or info.kind == kind]


def _known_names(kind: str | None = None) -> str:
    return ", ".join(name for name, info in LLAMAGEN_CHECKPOINTS.items() if kind is None or info.kind == kind)


#: suffixes of checkpoint files: a missing `name.pt` is a missing file, not an unknown registry name
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(name: str) -> bool:
    return "/" in name or os.sep in name or Path(name).suffix.lower() in _FILE_SUFFIXES


def _lookup(name: str) -> CheckpointInfo | None:
    """Registry entry for a short name or a released file name (``"c2i_B_256.pt"``), else None."""
    if name in LLAMAGEN_CHECKPOINTS:
        return LLAMAGEN_CHECKPOINTS[name]
    return next((info for info in LLAMAGEN_CHECKPOINTS.values() if info.filename == name), None)


def checkpoint_info(name: str) -> CheckpointInfo:
    """Registry entry for ``name`` (short name or file name); ValueError listing the known names."""
    info = _lookup(str(name))
    if info is None:
        raise ValueError(f"unknown LlamaGen checkpoint {name!r}; known names: {_known_names()}")
    return info


def _gpt_fields(info: CheckpointInfo) -> dict[str, Any]:
    """`LlamaGenConfig` fields that a GPT registry entry fixes on top of its preset."""
    fields = dict(
        vocab_size=info.codebook_size, block_size=info.block_size, num_classes=info.num_classes,
        cls_token_num=info.cls_token_num, model_type=info.model_type,
    )
    if info.caption_dim is not None:
        fields["caption_dim"] = info.caption_dim
    return fields


def _vq_fields(info: CheckpointInfo) -> dict[str, Any]:
    """`VQConfig` fields that a VQ registry entry fixes on top of its preset."""
    return dict(codebook_size=info.codebook_size, codebook_embed_dim=info.codebook_embed_dim)


def build_from_info(info: CheckpointInfo, **overrides: Any) -> LlamaGen | VQModel:
    """Build the (randomly initialised) model that ``info``'s checkpoint fits.

    GPTs come from :func:`build_llamagen` with the entry's vocabulary, block size and condition
    settings, tokenizers from :func:`build_vq`; ``overrides`` set any other config field. Build
    under ``with torch.device("meta"):`` to get the architecture without allocating weights.
    """
    _check_kind(info.kind)
    if info.kind == "gpt":
        return build_llamagen(info.preset, **{**_gpt_fields(info), **overrides})
    return build_vq(info.preset, **{**_vq_fields(info), **overrides})


# --------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------

#: Wrapper keys under which training scripts store the weights, in order of preference.
_WRAPPER_KEYS = {"gpt": ("model", "module", "state_dict", "ema"), "vq": ("ema", "model", "state_dict", "module")}
#: Key prefixes added by DistributedDataParallel / DeepSpeed and by ``torch.compile``.
_KEY_PREFIXES = ("module.", "_orig_mod.")
#: Classes allowed in a checkpoint besides tensors and containers (data only, no code).
_SAFE_GLOBALS = [argparse.Namespace]


def _torch_load(path: Path) -> Any:
    """``torch.load`` restricted to weights (``weights_only=True``); code-carrying pickles -> ValueError."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allow = safe_globals(_SAFE_GLOBALS) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a class the allow-list refused: broken pickle bytes
            raise unreadable_file(path, "not a torch checkpoint") from exc
        raise ValueError(
            f"refusing to load {path}: it is not a plain weights file (torch.load with weights_only=True "
            f"rejected it), and unpickling it could run arbitrary code. If you trust the file, re-save "
            f"just its state dict (or convert it to .safetensors) and load that instead."
        ) from exc
    except Exception as exc:  # torch.load's errors on bad bytes: KeyError, EOFError, OSError, RuntimeError, ...
        raise unreadable_file(path, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc


def _read_file(path: Path) -> Any:
    """Raw content of a ``.safetensors`` or torch checkpoint file, tensors on the CPU."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _torch_load(path)


def _unwrap(checkpoint: Any, kind: str) -> Mapping[str, Any]:
    """The weight mapping inside a checkpoint: ``checkpoint[key]`` for the first wrapper key found.

    A mapping without any wrapper key (e.g. a bare FSDP state dict) is the weights itself.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must hold a dict of tensors, got {type(checkpoint).__name__}")
    for key in _WRAPPER_KEYS[kind]:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def _strip_prefixes(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` (in any order, any number of times)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _is_weight(key: str, value: Any) -> bool:
    """False for non-tensors, rotary tables, causal masks and KV-cache entries (never weights here)."""
    if not isinstance(value, torch.Tensor):
        return False
    last = key.rsplit(".", 1)[-1]
    return last not in ("freqs_cis", "causal_mask") and "kv_cache" not in key


def load_state_dict_file(path: str | os.PathLike[str], *, kind: str) -> dict[str, torch.Tensor]:
    """Read a LlamaGen-style checkpoint file and return a clean state dict (CPU tensors).

    * ``.safetensors`` files are read with safetensors; anything else with ``torch.load(...,
      weights_only=True)``: a pickle that needs code to load raises ValueError, it is never run;
    * the weights are taken from ``"model"``, ``"module"``, ``"state_dict"`` or ``"ema"`` (for
      ``kind="vq"`` ``"ema"`` comes first, as LlamaGen's tokenizer demo), else the file is taken
      to be a bare state dict (as LlamaGen's FSDP checkpoints);
    * leading ``module.`` / ``_orig_mod.`` key prefixes are removed;
    * ``freqs_cis``, ``causal_mask``, ``kv_cache`` entries and non-tensor values are dropped.
    """
    _check_kind(kind)
    path = Path(path)
    weights = _unwrap(_read_file(path), kind)
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        key = _strip_prefixes(str(key))
        if _is_weight(key, value):
            cleaned[key] = value
    if not cleaned:
        raise ValueError(f"{path} holds no weight tensors")
    return cleaned


# --------------------------------------------------------------------------------------------
# Finding checkpoint files
# --------------------------------------------------------------------------------------------


def _hub_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(not-cached errors, network errors) of the installed huggingface_hub and HTTP client."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError
    network: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import httpx

        network.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        network += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return (LocalEntryNotFoundError,), tuple(network)


def _download(info: CheckpointInfo, *, cache_dir: str | os.PathLike[str] | None, revision: str | None,
              local_files_only: bool) -> Path:
    """Path of ``info``'s file in the Hugging Face cache, downloading it unless ``local_files_only``."""
    from huggingface_hub import hf_hub_download

    not_cached, network = _hub_errors()
    try:
        return Path(hf_hub_download(
            info.repo_id, info.filename, cache_dir=None if cache_dir is None else str(cache_dir),
            revision=revision, local_files_only=local_files_only,
        ))
    except (*not_cached, *network) as exc:
        where = "the Hugging Face cache" if cache_dir is None else f"the Hugging Face cache at {cache_dir}"
        why = "local_files_only=True" if local_files_only else (
            "the Hugging Face Hub could not be reached; offline, --local-files-only / local_files_only=True or "
            "HF_HUB_OFFLINE=1 skip the network and its retries")
        cache_opt = "" if cache_dir is None else f" --cache-dir {cache_dir}"
        rev_opt = "" if revision is None else f" --revision {revision}"
        raise FileNotFoundError(
            f"LlamaGen checkpoint {info.name!r} (file {info.filename} of the Hugging Face repo {info.repo_id}) "
            f"is not in {where} and was not downloaded ({why}). Download it while online with "
            f"`hf download {info.repo_id} {info.filename}{cache_opt}{rev_opt}` (`huggingface-cli download ...` "
            f"with huggingface_hub < 1.0), or pass the path of a local copy instead of the name."
        ) from exc


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> tuple[Path, CheckpointInfo | None]:
    """Local path of a checkpoint, and its registry entry when it is a released file.

    * an existing file is used as is; its entry is the one whose file name matches the file's base
      name (e.g. ``".../c2i_L_384.pt"``), else None;
    * a registry name (``"c2i_L_384"`` or ``"c2i_L_384.pt"``) is fetched with
      ``huggingface_hub.hf_hub_download`` (``cache_dir``, ``revision`` and ``local_files_only``
      are passed on); if it is not cached and cannot be downloaded, FileNotFoundError says which
      repo and file are needed and how to get them;
    * anything else raises ValueError listing the known names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, _lookup(path.name)
    info = _lookup(str(name_or_path))
    if info is None and _looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"no checkpoint file {name_or_path} (nor a LlamaGen registry name; those look "
                                f"like c2i_B_256 or vq_ds16_c2i)")
    if info is None:
        raise ValueError(
            f"{str(name_or_path)!r} is neither an existing file nor a known LlamaGen checkpoint; "
            f"known names: {_known_names()}"
        )
    return _download(info, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only), info


# --------------------------------------------------------------------------------------------
# Inferring configurations from weights
# --------------------------------------------------------------------------------------------


def _count_indices(state_dict: Mapping[str, Any], prefix: str) -> int:
    """Number of entries of a ModuleList stored under ``prefix`` (``prefix + "<i>."``), 0 if none."""
    indices = {
        int(head) for key in state_dict if key.startswith(prefix)
        and (head := key[len(prefix):].split(".", 1)[0]).isdigit()
    }
    return max(indices) + 1 if indices else 0


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> torch.Tensor:
    """``state_dict[key]``, or ValueError saying the weights do not look like ``what``."""
    if key not in state_dict:
        raise ValueError(f"the weights do not look like a {what}: no {key!r} entry")
    return state_dict[key]


def _match_preset(dim: int, n_layer: int) -> str | None:
    """The LlamaGen preset with this width and depth, or None."""
    return next((name for name, p in LLAMAGEN_PRESETS.items() if (p["dim"], p["n_layer"]) == (dim, n_layer)), None)


def _block_size(image_size: int, downsample: int) -> int:
    """Image tokens per sample for ``image_size`` pixels at ``downsample`` pixels per token side."""
    if image_size < 1 or image_size % downsample:
        raise ValueError(f"image_size must be a positive multiple of {downsample}, got {image_size}")
    return (image_size // downsample) ** 2


def _config_default(name: str) -> Any:
    return LlamaGenConfig.__dataclass_fields__[name].default


def _infer_kv_heads(state_dict: Mapping[str, Any], dim: int, n_head: int) -> int | None:
    """Key/value head count from the fused qkv projection, None when it equals ``n_head``."""
    wqkv = state_dict.get("layers.0.attention.wqkv.weight")
    if wqkv is None or n_head < 1 or dim % n_head:
        return None
    head_dim = dim // n_head
    extra, rest = divmod(wqkv.shape[0] // head_dim - n_head, 2)
    if wqkv.shape[0] % head_dim or rest or extra < 1 or n_head % extra or extra == n_head:
        return None  # no grouped-query layout, or weights that the strict load will report
    return extra


def infer_llamagen_config(
    state_dict: Mapping[str, Any],
    *,
    preset: str | None = None,
    image_size: int | None = None,
    downsample: int = DEFAULT_DOWNSAMPLE,
    **overrides: Any,
) -> LlamaGenConfig:
    """The `LlamaGenConfig` that a GPT state dict fits (works on meta-device state dicts).

    * width and depth: ``tok_embeddings.weight`` columns and the number of ``layers.<i>`` blocks;
      they select the preset with that (dim, n_layer), which fixes ``n_head``. A state dict
      matching no preset needs ``preset=`` or an ``n_head=`` override. An explicit ``preset``
      fixes dim, depth and heads itself (a wrong one shows up as a strict-load mismatch);
    * ``vocab_size``: embedding rows; ``n_kv_head``: from the ``wqkv`` rows;
    * condition: ``cls_embedding.cap_proj`` weights mean text-conditional (``model_type="t2i"``,
      ``caption_dim`` from ``fc1``, ``cls_token_num=120``), else class-conditional with
      ``num_classes`` = label-table rows minus the null class (when ``class_dropout_prob > 0``);
    * ``block_size``: weights do not carry it; it is ``(image_size // downsample) ** 2`` with
      ``image_size`` defaulting to 256 (a 16 x 16 grid for ds16 tokens). Pass the size the model
      was trained at (e.g. 384 for ``c2i_*_384``) to sample at the right resolution.

    ``overrides`` set any `LlamaGenConfig` field and win over everything inferred.
    """
    embed = _require(state_dict, "tok_embeddings.weight", "LlamaGen GPT state dict")
    vocab_size, dim = int(embed.shape[0]), int(embed.shape[1])
    n_layer = _count_indices(state_dict, "layers.")
    if preset is None:
        preset = _match_preset(dim, n_layer)
        if preset is None and "n_head" not in overrides:
            known = ", ".join(f"{k} (dim={p['dim']}, n_layer={p['n_layer']})" for k, p in LLAMAGEN_PRESETS.items())
            raise ValueError(
                f"no LlamaGen preset has dim={dim} and n_layer={n_layer}; pass preset= (with overrides) or an "
                f"n_head= override (on the command line: --preset, --model-config n_head=N). Known presets: {known}"
            )
    elif preset not in LLAMAGEN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(LLAMAGEN_PRESETS)}")
    fields: dict[str, Any] = dict(LLAMAGEN_PRESETS[preset]) if preset else dict(dim=dim, n_layer=n_layer)
    fields["vocab_size"] = vocab_size
    fields["block_size"] = _block_size(image_size or DEFAULT_IMAGE_SIZE, downsample)
    fc1 = state_dict.get("cls_embedding.cap_proj.fc1.weight")
    if fc1 is not None:
        fields.update(model_type="t2i", caption_dim=int(fc1.shape[1]), cls_token_num=T2I_CLS_TOKEN_NUM)
    else:
        fields.update(model_type="c2i", cls_token_num=1)
    fields.update(overrides)

    table = state_dict.get("cls_embedding.embedding_table.weight")
    if "num_classes" not in overrides and fields["model_type"] == "c2i" and table is not None:
        null_class = int(fields.get("class_dropout_prob", _config_default("class_dropout_prob")) > 0)
        fields["num_classes"] = int(table.shape[0]) - null_class
    if "n_kv_head" not in overrides:
        fields["n_kv_head"] = _infer_kv_heads(state_dict, fields["dim"], fields["n_head"])
    return LlamaGenConfig.from_dict(fields)


def _vq_preset_config(preset: str, **fields: Any) -> VQConfig:
    """The `VQConfig` of ``build_vq(preset, **fields)``, read off a weightless meta-device build."""
    with torch.device("meta"):
        return build_vq(preset, **fields).config


@functools.cache
def _vq_preset_stages() -> dict[str, tuple[int, ...]]:
    """Encoder channel multipliers of each VQ preset (computed once, from weightless builds)."""
    return {name: tuple(_vq_preset_config(name).encoder_ch_mult) for name in VQ_MODELS}


def _vq_preset_name(config: VQConfig) -> str | None:
    """The VQ preset whose encoder stages match ``config``'s, or None."""
    mult = tuple(config.encoder_ch_mult)
    return next((name for name, stages in _vq_preset_stages().items() if stages == mult), None)


def _vq_channel_multipliers(state_dict: Mapping[str, Any], base: int) -> dict[str, list[int]]:
    """`encoder_ch_mult` / `decoder_ch_mult` read off each stage's first convolution (width base * mult);
    empty when the weights lack those convolutions (a partial state dict)."""
    found: dict[str, list[int]] = {}
    for part in ("encoder", "decoder"):
        widths = []
        for stage in range(_count_indices(state_dict, f"{part}.conv_blocks.")):
            weight = state_dict.get(f"{part}.conv_blocks.{stage}.res.0.conv1.weight")
            if weight is None or weight.shape[0] % base:
                return {}
            widths.append(int(weight.shape[0]) // base)
        if widths:  # the decoder runs its stages from the widest down
            found[f"{part}_ch_mult"] = widths if part == "encoder" else widths[::-1]
    return found


def infer_vq_config(state_dict: Mapping[str, Any], *, preset: str | None = None, **overrides: Any) -> VQConfig:
    """The `VQConfig` that a VQ tokenizer state dict fits (works on meta-device state dicts).

    The preset ("VQ-16" or "VQ-8") follows from the number of encoder stages (one more than the
    number of 2x down-samplings); ``codebook_size`` and ``codebook_embed_dim`` come from the
    quantizer embedding, ``z_channels``, ``base_channels`` and ``num_res_blocks`` from the encoder,
    ``codebook_show_usage`` from the presence of ``quantize.codebook_used``. ``overrides`` win.
    """
    codebook = _require(state_dict, "quantize.embedding.weight", "LlamaGen VQ state dict")
    fields: dict[str, Any] = dict(codebook_size=int(codebook.shape[0]), codebook_embed_dim=int(codebook.shape[1]))
    if "encoder.conv_in.weight" in state_dict:
        fields["base_channels"] = int(state_dict["encoder.conv_in.weight"].shape[0])
        fields.update(_vq_channel_multipliers(state_dict, fields["base_channels"]))
    if preset is None:
        stages = _count_indices(state_dict, "encoder.conv_blocks.")
        by_stages = {len(mult): name for name, mult in _vq_preset_stages().items()}
        if stages not in by_stages and "encoder_ch_mult" not in fields:
            raise ValueError(
                f"no VQ preset has {stages} encoder stages (known: "
                f"{', '.join(f'{v}: {k}' for k, v in by_stages.items())}); pass preset="
            )
        preset = by_stages.get(stages, "VQ-16")  # a custom stage count: VQ-16's other settings, these stages
    if "encoder.conv_out.weight" in state_dict:
        fields["z_channels"] = int(state_dict["encoder.conv_out.weight"].shape[0])
    res_blocks = _count_indices(state_dict, "encoder.conv_blocks.0.res.")
    if res_blocks:
        fields["num_res_blocks"] = res_blocks
    fields["codebook_show_usage"] = "quantize.codebook_used" in state_dict
    return _vq_preset_config(preset, **{**fields, **overrides})


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Missing / unexpected keys and shape mismatches between ``model`` and ``state_dict``, or None."""
    return describe_mismatch(model.state_dict(), state_dict)


def _fill_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, label: str, path: Path) -> None:
    """Load ``state_dict`` strictly into the meta-device ``model`` by assigning its tensors."""
    report = _mismatch_report(model, state_dict)
    if report is not None:
        raise ValueError(
            f"{path} does not fit {label}: {report}. Pass the preset / config overrides the checkpoint "
            f"was trained with."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)


def _check_materialized(model: nn.Module) -> None:
    """Guard: after loading, no parameter or buffer may still live on the meta device."""
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left without values after loading: {first_items(left)}")


def _place(model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """Move to ``device`` and cast floating-point tensors to ``dtype`` (default: torch's default dtype)."""
    return model.to(device=device, dtype=dtype or torch.get_default_dtype()).eval()


def _describe(config: LlamaGenConfig) -> str:
    return (f"dim={config.dim}, n_layer={config.n_layer}, n_head={config.n_head}, n_kv_head={config.n_kv_head}, "
            f"vocab_size={config.vocab_size}, model_type={config.model_type}")


def _gpt_config(state_dict: Mapping[str, Any], info: CheckpointInfo | None, preset: str | None,
                image_size: int | None, overrides: dict[str, Any]) -> tuple[LlamaGenConfig, str]:
    """Config to load a GPT with, and a label naming the preset tried (for error messages)."""
    if info is None:
        config = infer_llamagen_config(state_dict, preset=preset, image_size=image_size, **overrides)
        preset = preset or _match_preset(config.dim, config.n_layer)
        name = f"preset {preset!r}" if preset else "a custom config"
        return config, f"{name} ({_describe(config)}, inferred from the weights)"
    preset = preset or info.preset
    if preset not in LLAMAGEN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(LLAMAGEN_PRESETS)}")
    fields = {**LLAMAGEN_PRESETS[preset], **_gpt_fields(info)}
    if image_size is not None:
        fields["block_size"] = _block_size(image_size, info.downsample)
    config = LlamaGenConfig.from_dict({**fields, **overrides})
    return config, f"preset {preset!r} ({_describe(config)}, from the registry entry {info.name!r})"


def _ensure_kind(info: CheckpointInfo | None, kind: str) -> None:
    """ValueError when a registry entry is of the other kind (a tokenizer given to the GPT loader...)."""
    if info is not None and info.kind != kind:
        loader = "load_llamagen" if info.kind == "gpt" else "load_vq"
        what = "GPT" if info.kind == "gpt" else "VQ tokenizer"
        wanted = "VQ tokenizer" if info.kind == "gpt" else "GPT"
        flag = "--model" if info.kind == "gpt" else "--vq"
        raise ValueError(f"{info.name!r} is a {what} checkpoint, not a {wanted}; load it with {loader} (on the "
                         f"command line: pass it as {flag})")


def _resolve_kind(name_or_path: str | os.PathLike[str], kind: str, **hub_options: Any
                  ) -> tuple[Path, CheckpointInfo | None]:
    """`resolve_checkpoint` that rejects a registry entry of the other kind before downloading it."""
    if not Path(name_or_path).expanduser().is_file():
        info = _lookup(str(name_or_path))
        _ensure_kind(info, kind)
        if info is None and not _looks_like_path(str(name_or_path)):
            what = "GPT" if kind == "gpt" else "VQ tokenizer"
            raise ValueError(f"{str(name_or_path)!r} is neither an existing file nor a known LlamaGen {what} "
                             f"checkpoint; known {what} names: {_known_names(kind)}")
    path, info = resolve_checkpoint(name_or_path, **hub_options)
    _ensure_kind(info, kind)
    return path, info


def load_llamagen(
    name_or_path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    **config_overrides: Any,
) -> LlamaGen:
    """Load a LlamaGen GPT checkpoint (registry name or local file) into an eval-mode `LlamaGen`.

    The configuration comes from the registry entry when there is one (a registry name, or a local
    file named like a released one), else it is inferred from the weights (see
    :func:`infer_llamagen_config`; ``block_size`` then assumes 256 px images unless
    ``image_size`` is given). ``preset`` replaces the entry's / inferred preset, ``image_size``
    sets ``block_size`` (``(image_size // 16) ** 2``), and ``config_overrides`` set any other
    `LlamaGenConfig` field. The weights load with strict key and shape checking (ValueError naming
    missing / unexpected keys, shape mismatches and the preset tried); the model is then moved to
    ``device`` and cast to ``dtype`` (default: torch's default dtype, float32 unless changed).
    ``model.hub_info`` holds the registry entry (with ``image_size`` updated when given) or None.
    """
    path, info = _resolve_kind(name_or_path, "gpt", cache_dir=cache_dir, revision=revision,
                               local_files_only=local_files_only)
    state_dict = load_state_dict_file(path, kind="gpt")
    try:
        config, label = _gpt_config(state_dict, info, preset, image_size, config_overrides)
    except ValueError as err:  # say which file could not be read as a GPT
        raise ValueError(f"{path}: {err}") from None
    with torch.device("meta"):
        model = LlamaGen(config)
    _fill_weights(model, state_dict, label=label, path=path)
    # The rotary table is not stored in checkpoints; compute it for the loaded configuration.
    model.freqs_cis = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base,
                                              config.cls_token_num)
    _check_materialized(model)
    if info is not None and image_size is not None and image_size != info.image_size:
        info = dataclasses.replace(info, image_size=image_size)
    model.hub_info = info
    return _place(model, device, dtype)


def load_vq(
    name_or_path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    **config_overrides: Any,
) -> VQModel:
    """Load a LlamaGen VQ tokenizer checkpoint (registry name or local file) into an eval-mode `VQModel`.

    Like :func:`load_llamagen`: the configuration comes from the registry entry, else from the
    weights (:func:`infer_vq_config`); ``preset`` and ``config_overrides`` (any `VQConfig` field)
    take precedence; EMA weights are preferred when the file has them; loading is strict;
    ``model.hub_info`` holds the registry entry or None.
    """
    path, info = _resolve_kind(name_or_path, "vq", cache_dir=cache_dir, revision=revision,
                               local_files_only=local_files_only)
    state_dict = load_state_dict_file(path, kind="vq")
    if info is None:
        try:
            config = infer_vq_config(state_dict, preset=preset, **config_overrides)
        except ValueError as err:  # say which file could not be read as a tokenizer
            raise ValueError(f"{path}: {err}") from None
        source = "inferred from the weights"
    else:
        config = _vq_preset_config(preset or info.preset, **{**_vq_fields(info), **config_overrides})
        source = f"from the registry entry {info.name!r}"
    name = preset or _vq_preset_name(config)
    factor = 2 ** (len(config.encoder_ch_mult) - 1)
    label = (f"{f'preset {name!r}' if name else 'a custom VQ config'} (downsample {factor}, "
             f"codebook {config.codebook_size} x {config.codebook_embed_dim}, {source})")
    with torch.device("meta"):
        model = VQModel(config)
    _fill_weights(model, state_dict, label=label, path=path)
    _check_materialized(model)
    model.hub_info = info
    return _place(model, device, dtype)

