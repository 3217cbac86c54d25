"""`tensorar tokenize`: encode an image folder into VQ codes for `tensorar finetune` (LlamaGen's layout).

IMAGES holds one sub-folder per class (ImageNet's `train/` as it unpacks, torchvision's `ImageFolder`);
images are resized and center-cropped to `--image-size` (LlamaGen's preprocessing) and encoded with the
tokenizer `--vq`, together with their mirror image (`--no-flip` to skip it), or as ten views with
`--ten-crop` (the extraction LlamaGen's GETTING_STARTED.md uses: `--ten-crop --crop-range 1.1`). The
codes go to `<out>/<name>_codes/<i>.npy`, the labels to `<out>/<name>_labels/<i>.npy`, as LlamaGen's
`extract_codes_c2i.py` writes them. An interrupted run resumes: run the same command again. Under
`torchrun` every process encodes its share of the batches.

    torchrun --nproc_per_node 8 -m tensorar_plugin.cli tokenize /data/imagenet/train --out /data/codes \\
        --name imagenet256 --vq vq_ds16_c2i --image-size 256
    tensorar finetune --model c2i_B_256 --codes /data/codes --window 4 --out runs/b256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .sample import add_device_arguments, start_processes

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize", help="encode an image folder into VQ codes for finetune (resumable, torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, metavar="IMAGES", help="image folder with one sub-folder per class")
    p.add_argument("--out", type=Path, required=True, help="folder for <name>_codes/ and <name>_labels/")
    p.add_argument("--vq", default="vq_ds16_c2i",
                   help="tokenizer: hub name or checkpoint file (default vq_ds16_c2i, LlamaGen's)")
    p.add_argument("--image-size", type=int, default=256,
                   help="resize and center-crop to this size (default 256; 384 for LlamaGen's 384-px models)")
    p.add_argument("--name", default=None, help="folder prefix (default images<image size>)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per step and process; the tokenizer takes at most twice as many views at once "
                        "(an image and its mirror), with --ten-crop too (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that read and crop images per encoding process (default: up to 4)")
    p.add_argument("--no-flip", action="store_true", help="do not store the mirrored image as a second view")
    p.add_argument("--ten-crop", action="store_true",
                   help="store ten views per image as LlamaGen's --ten-crop: the corners and centre of a "
                        "--crop-range larger center crop, and of its mirror")
    p.add_argument("--crop-range", type=float, default=None,
                   help="with --ten-crop: the crop the views are cut from, relative to --image-size (default 1.1)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the codes already under --out/--name and start again (default: resume)")
    add_device_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch.distributed as dist

    from ..cli import about_flag
    from ..hub import load_vq
    from ..image_codes import check_output_name, distributed_sync, tokenize_images

    for flag in ("image_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ten_crop and args.no_flip:
        raise ValueError("--ten-crop stores mirrored crops by itself (five of the ten views): drop --no-flip")
    if args.crop_range is not None and not args.ten_crop:
        raise ValueError("--crop-range only applies with --ten-crop (the crop its ten views are cut from)")
    crop_range = 1.1 if args.crop_range is None else args.crop_range
    if not 1.0 <= crop_range < 4.0:
        raise ValueError(f"--crop-range must be in [1, 4), got {crop_range}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.name is not None:
        check_output_name(args.name, "--name")
    if not args.images.is_dir():
        raise ValueError(f"IMAGES {args.images}: not a folder (expected one sub-folder of images per class)")
    device, dtype, rank, world, started = start_processes(args)
    try:
        with about_flag("--vq", args.vq):
            vq = load_vq(args.vq, device=device, dtype=dtype)
        if args.image_size % vq.downsample_factor:
            raise ValueError(f"--image-size {args.image_size} must be a multiple of the tokenizer's downsample "
                             f"factor {vq.downsample_factor} (--vq {args.vq})")
        if rank == 0:
            print(f"tokenizing {args.images} with {args.vq} at {args.image_size} px on {world} process(es) into "
                  f"{args.out}", file=sys.stderr)
        began = time.perf_counter()
        codes_dir = tokenize_images(args.images, vq, args.out, batch_size=args.batch_size,
                                    progress=not args.no_progress, flip=not args.no_flip, ten_crop=args.ten_crop,
                                    crop_range=crop_range, image_size=args.image_size, name=args.name,
                                    overwrite=args.overwrite, resume=not args.overwrite, num_workers=args.workers,
                                    rank=rank, world_size=world, sync=distributed_sync if world > 1 else None)
        if world > 1:
            dist.barrier()
        if rank == 0:
            count = sum(1 for p in codes_dir.glob("*.npy") if p.stem.isdigit())
            print(f"tokenizing took {time.perf_counter() - began:.1f} s (this run's images only: a resumed run skips "
                  f"the finished ones)", file=sys.stderr)
            print(f"wrote the codes of {count} images to {codes_dir}; fine-tune on them with "
                  f"`tensorar finetune --codes {codes_dir} ...`")
    finally:
        if started:
            dist.destroy_process_group()
    return 0
