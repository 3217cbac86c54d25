"""`tensorar sample`: sample a class-conditional image grid (one row per class) and write it as PNG.

With no arguments it uses the bundled demo model (MNIST digits, fully offline). `--model` takes a
LlamaGen registry name (e.g. `c2i_B_256`, loaded through `tensorar_plugin.hub` together with its
paired VQ; `--tensorar DIR` adds TensorAR parts saved by `save_pretrained`, otherwise the model is
sampled plainly with `--window 1`), a demo-style bundle folder (written by
`examples/train_demo.py --out DIR`), or a folder written by `TensorARWrapper.save_pretrained`
(backbone included; pass `--vq`; the token grid comes from its `backbone_config.json`). A local
checkpoint file whose shape is not a LlamaGen preset takes `--preset` / `--model-config`, or, with
`--tensorar DIR`, the `backbone_config.json` saved in DIR.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["register", "run", "add_model_arguments", "add_device_arguments", "add_sampling_arguments",
           "sampling_settings", "check_sampling_flags", "resolve_device", "start_processes", "load_model"]

#: LlamaGen's demo classes (ImageNet ids), used for hub models when --classes is not given
IMAGENET_DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="sample an image grid (the bundled demo model by default, offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write (default samples.png)")
    p.add_argument("--history", action="store_true", help="also write a picture of the refinement (drafts to final)")
    p.add_argument("--history-out", type=Path, default=None, help="default: <out stem>_history.png")
    p.add_argument("--history-samples", type=int, default=8, help="samples shown in the history picture")
    p.add_argument("--seed", type=int, default=0)
    add_sampling_arguments(p)
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: all demo classes)")
    p.add_argument("--per-class", "--batch", dest="per_class", type=int, default=8,
                   help="samples per class = images per row (default 8)")
    p.add_argument("--scale", type=int, default=None, help="pixel upscaling of the grid (default: 2 for the demo)")
    add_device_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def add_model_arguments(p) -> None:
    """The model flags shared by `tensorar sample` and `tensorar sample-npz` (read by `load_model`)."""
    p.add_argument("--model", default=None,
                   help="hub name (e.g. c2i_B_256), a demo bundle folder, or a save_pretrained folder "
                        "(default: the bundled MNIST demo)")
    p.add_argument("--tensorar", default=None, metavar="DIR",
                   help="TensorAR parts saved by save_pretrained, put around a --model hub backbone")
    p.add_argument("--vq", default=None,
                   help="tokenizer (hub name or file); needed for a save_pretrained folder or a checkpoint file "
                        "not named like a released one")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size of a hub model or checkpoint file (sets its token grid); a save_pretrained "
                        "folder carries its own")
    p.add_argument("--window", type=int, default=None,
                   help="window for a hub model without --tensorar parts: 1 (default) samples plainly; "
                        "larger windows add untrained parts: the same distribution (and greedy tokens), slower")
    add_checkpoint_arguments(p)


#: sampling settings with a flag each; unset flags take the model's defaults (`sampling_settings`)
SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "draft")


def add_sampling_arguments(p) -> None:
    """The sampling flags shared by `tensorar sample` and `tensorar sample-npz` (read by `sampling_settings`)."""
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--draft", choices=("sample", "argmax"), default=None, help="how draft slots are chosen")


def check_sampling_flags(args) -> None:
    """Check the sampling flags that were given before any model is loaded (a `ValueError` naming the flag)."""
    from ..sampling import check_sampling_args

    given = {key: getattr(args, key) for key in SAMPLING_KEYS if key != "draft" and getattr(args, key) is not None}
    try:
        check_sampling_args(**given)
    except ValueError as err:
        flag = str(err).split(" ", 1)
        raise ValueError(f"--{flag[0].replace('_', '-')} {flag[1]}") from None


def sampling_settings(args, defaults: dict) -> dict:
    """The sampling settings: each flag given, else the model's default."""
    return {key: getattr(args, key) if getattr(args, key) is not None else defaults[key] for key in SAMPLING_KEYS}


def resolve_device(device: str | None) -> str:
    """`--device` (default: cuda when available); a `ValueError` when it does not exist here."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no CUDA GPU here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}, but MPS is not available here")
    return device


class ProcessPlace(NamedTuple):
    """Where a command runs: its device and dtype, and its place among the torchrun processes."""

    device: str
    dtype: Any  # a torch.dtype, or None for the model's own
    rank: int
    world: int
    started_group: bool  # this call started the process group (and should destroy it)


def start_processes(args) -> ProcessPlace:
    """The device flags (`add_device_arguments`) applied, under torchrun with a process group started:
    threads set, the device checked (`cuda` becomes this process's `cuda:<LOCAL_RANK>`), the dtype read."""
    import torch

    from ..train import distributed_info, init_distributed

    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    device = resolve_device(args.device)
    started = init_distributed(args.device)
    rank, world, local_rank = distributed_info()
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{local_rank}"
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    return ProcessPlace(device, dtype, rank, world, started)


def check_threads(threads: int) -> int:
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    return threads


def check_image_path(flag: str, path: Path) -> None:
    """An image file name PIL can write (its suffix picks the format), checked before sampling."""
    from PIL import Image

    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"{flag} {path}: the file name needs an image suffix such as .png (it picks the format)")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; pass an image file name such as {path / 'grid.png'}")


def add_checkpoint_arguments(p) -> None:
    """How a LlamaGen checkpoint is read and found (`sample`, `sample-npz`, `finetune`): preset, config
    overrides, Hugging Face cache folder, offline."""
    p.add_argument("--preset", default=None,
                   help="LlamaGen preset (GPT-B, GPT-L, ...) of a checkpoint whose shape cannot be inferred from its "
                        "weights")
    p.add_argument("--model-config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a LlamaGenConfig field of the checkpoint (repeatable), e.g. n_head=4 or "
                        "resid_dropout_p=0.0")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder for registry downloads")
    p.add_argument("--local-files-only", action="store_true",
                   help="never download: use the Hugging Face cache or local files only (no retries offline)")


def add_device_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; on a busy machine fewer can be faster for small "
                        "models)")


def check_model_flags(args) -> None:
    """Refuse model flags that the chosen kind of --model would ignore, before anything is loaded."""
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be >= 1 (1 samples plainly), got {args.window}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    given = [flag for flag, value in (("--tensorar", args.tensorar), ("--window", args.window), ("--vq", args.vq),
                                      ("--image-size", args.image_size), ("--preset", args.preset),
                                      ("--model-config", args.model_config or None)) if value is not None]
    path = Path(args.model) if args.model is not None else None
    if path is None or (path.is_dir() and (path / "demo_info.json").is_file()):
        if given:
            raise ValueError(f"{', '.join(given)}: these flags apply to hub models, checkpoint files and "
                             f"save_pretrained folders (--model), not to a demo bundle, which carries its own")
    elif path.is_dir():
        from ..wrapper import BACKBONE_CONFIG_NAME

        ignored = ["--tensorar"] if "--tensorar" in given else []
        if (path / BACKBONE_CONFIG_NAME).is_file():  # without it, the backbone's shape comes from these flags
            ignored += [flag for flag in ("--image-size", "--preset", "--model-config") if flag in given]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: {path} is a save_pretrained folder, which carries its own "
                             f"backbone settings and TensorAR parts (--tensorar adds parts to a hub model or "
                             f"checkpoint file)")


def _backbone_overrides(args) -> dict[str, Any]:
    """LlamaGenConfig fields for a hub model / checkpoint file: --model-config, else the backbone_config.json
    that save_pretrained wrote beside --tensorar parts (a backbone that is no preset needs it to load)."""
    from .finetune import parse_overrides

    if args.preset is not None or args.model_config or not args.tensorar:
        return parse_overrides(args.model_config)
    from ..files import read_json
    from ..wrapper import BACKBONE_CONFIG_NAME

    saved = Path(args.tensorar) / BACKBONE_CONFIG_NAME
    if not saved.is_file():
        return {}
    overrides = read_json(saved)
    if args.image_size is not None:
        overrides.pop("block_size", None)  # --image-size sets it
    return overrides


def load_model(args, device, dtype, *, fid_defaults: bool = False):
    """-> (wrapper, vq, grid, defaults dict, classes default, scale default, description).

    Hub models default to LlamaGen's demo `top_k` (2000), or with `fid_defaults` to no truncation, the
    setting of LlamaGen's FID numbers.
    """
    import torch

    from ..cli import about_flag
    from ..wrapper import TensorARWrapper

    base_defaults = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, draft="sample")
    check_model_flags(args)
    if args.model is None or (Path(args.model).is_dir() and (Path(args.model) / "demo_info.json").is_file()):
        from ..demo import load_demo

        bundle = load_demo(device=device, dtype=dtype, directory=args.model)
        info = bundle.info
        defaults = {**base_defaults, **info.get("sampling", {})}
        return (bundle.wrapper, bundle.vq, info["grid"], defaults, list(range(len(info["class_names"]))), 2,
                f"demo model ({info.get('name', 'bundled')})")

    from ..hub import infer_llamagen_config, load_llamagen, load_vq
    from ..models.llamagen import LlamaGen

    path = Path(args.model)
    if path.is_dir():  # a folder written by save_pretrained, backbone included
        from ..files import read_json, read_safetensors
        from ..models.llamagen import LlamaGenConfig
        from ..wrapper import BACKBONE_CONFIG_NAME, WEIGHTS_NAME

        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{path} has no {WEIGHTS_NAME}: save it with save_pretrained(save_backbone=True)"
                             f" or pass a hub backbone with --model NAME --tensorar {path}")
        if args.vq is None:
            raise ValueError("a save_pretrained folder needs --vq (tokenizer hub name or file)")
        with about_flag("--vq", args.vq):  # first: its downsample factor turns --image-size into a token grid
            vq = load_vq(args.vq, device=device, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
        saved_config = path / BACKBONE_CONFIG_NAME
        if saved_config.is_file():  # written by save_pretrained for LlamaGen backbones
            config = LlamaGenConfig.from_dict(read_json(saved_config))
        else:  # an older folder: the shape from the weights, the flags and the tokenizer
            state = read_safetensors(weights)
            base_state = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
            with about_flag("--model", path):
                config = infer_llamagen_config(base_state, preset=args.preset, image_size=args.image_size,
                                               downsample=vq.downsample_factor,
                                               **_backbone_overrides(args))
        wrapper = TensorARWrapper.from_pretrained(path, LlamaGen(config))
        if args.window is not None and args.window != wrapper.window:
            raise ValueError(f"--window {args.window}, but {path} holds a TensorAR model with window {wrapper.window}")
        grid = config.grid_size
        defaults = base_defaults
        desc = f"{path} (window {wrapper.window})"
    else:
        hub = dict(cache_dir=args.cache_dir, local_files_only=args.local_files_only)
        with about_flag("--model", args.model):
            gpt = load_llamagen(args.model, preset=args.preset, image_size=args.image_size, **hub,
                                **_backbone_overrides(args))
        info = gpt.hub_info
        if args.tensorar:
            with about_flag("--tensorar", args.tensorar):
                wrapper = TensorARWrapper.from_pretrained(args.tensorar, gpt, **hub)
            if args.window is not None and args.window != wrapper.window:
                raise ValueError(f"--window {args.window}, but {args.tensorar} holds TensorAR parts with window "
                                 f"{wrapper.window}")
        else:
            wrapper = TensorARWrapper(gpt, window=args.window or 1)
        vq_name = args.vq or (info.vq if info is not None else None)
        if vq_name is None:
            raise ValueError("no paired tokenizer known for this model: pass --vq")
        with about_flag("--vq", vq_name):
            vq = load_vq(vq_name, device=device, **hub)
        grid = gpt.config.grid_size
        defaults = {**base_defaults, "cfg_scale": (info.cfg_scale if info and info.cfg_scale else 2.0),
                    "top_k": (info.top_k if info and info.top_k and not fid_defaults else 0)}
        desc = f"{args.model} (window {wrapper.window}{', TensorAR parts ' + args.tensorar if args.tensorar else ''})"
    wrapper = wrapper.to(device=device, dtype=dtype or torch.float32).eval()
    classes = IMAGENET_DEMO_CLASSES if wrapper.base_model.config.num_classes == 1000 else \
        list(range(min(10, wrapper.base_model.config.num_classes)))
    return wrapper, vq, grid, defaults, classes, 1, desc


def run(args) -> int:
    import torch

    from ..visualize import image_grid, render_history, tokens_to_images

    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    check_image_path("--out", args.out)
    if args.history_out is not None:
        check_image_path("--history-out", args.history_out)
    for flag, value in (("--per-class", args.per_class), ("--history-samples", args.history_samples),
                        ("--scale", args.scale)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_sampling_flags(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    wrapper, vq, grid, defaults, default_classes, default_scale, desc = load_model(args, device, dtype)
    classes = args.classes if args.classes is not None else default_classes
    num_classes = wrapper.base_model.config.num_classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad}: class ids must be in [0, {num_classes - 1}] ({num_classes} classes)")
    settings = sampling_settings(args, defaults)
    cond = torch.tensor(classes, device=device).repeat_interleave(args.per_class)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"sampling {len(cond)} images ({len(classes)} classes x {args.per_class}) from {desc} on {device}; "
          + ", ".join(f"{k}={v}" for k, v in settings.items()), file=sys.stderr)
    start = time.time()
    out = wrapper.generate(cond, generator=gen, return_history=args.history, progress=not args.no_progress,
                           **settings)
    tokens = out.tokens if args.history else out
    elapsed = time.time() - start
    scale = args.scale if args.scale is not None else default_scale
    images = tokens_to_images(vq, tokens, grid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=args.per_class, scale=scale).save(args.out)
    print(f"wrote {args.out} ({len(images)} images, one row per class; sampling took {elapsed:.1f} s)")
    if args.history:
        target = args.history_out or args.out.with_name(f"{args.out.stem}_history.png")
        # one sample per class first, so the picture shows several classes
        order = torch.arange(len(cond)).reshape(len(classes), args.per_class).t().reshape(-1)
        picture = render_history(vq, out.history[order], tokens[order], grid, max_samples=args.history_samples,
                                 scale=scale)
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target)
        print(f"wrote {target} (rows: samples; columns: draft slot 1..{wrapper.window}, last = final)")
    return 0
