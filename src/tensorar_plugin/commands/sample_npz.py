"""`tensorar sample-npz`: draw many images for an FID evaluation into an ADM-evaluator `.npz`.

Images go to `--out` as `<index:06d>.png` (an interrupted run resumes where it stopped), then into
`<out>.npz` (`arr_0` uint8 [N, H, W, 3], `arr_1` labels), the format of OpenAI's ADM evaluator that
LlamaGen and the TensorAR paper report with. Under `torchrun` every process draws its share of the
batches; the images depend on `--seed` and `--batch-size` only. `--reference` adds an offline FID
(`tensorar fid`). The model flags are those of `tensorar sample`.

    torchrun --nproc_per_node 8 -m tensorar_plugin.cli sample-npz --model c2i_B_256 --tensorar runs/b256/final \\
        --cfg-scale 2.0 --num-samples 50000 --out samples/b256 --compile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .sample import (
    add_device_arguments,
    add_model_arguments,
    add_sampling_arguments,
    check_sampling_flags,
    load_model,
    sampling_settings,
    start_processes,
)

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample-npz", help="sample many images for FID into an ADM-evaluator .npz (resumable, torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--num-samples", type=int, default=50_000, help="images to draw (default 50000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and process (default 64)")
    p.add_argument("--out", type=Path, default=Path("eval_samples"),
                   help="folder for the PNGs (default eval_samples); the .npz is written next to it")
    p.add_argument("--npz", type=Path, default=None, help="the .npz to write (default <out>.npz)")
    p.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                   help="class of sample i: i %% num_classes (default) or uniform random (LlamaGen's script)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=None,
                   help="resize images to this many pixels (bicubic; LlamaGen evaluates 384-px models at 256)")
    add_sampling_arguments(p)
    p.add_argument("--cfg-interval", type=int, default=-1,
                   help="guide only the first N + 2 tokens, as LlamaGen's --cfg-interval N (-1: all)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (one CUDA graph per step)")
    p.add_argument("--reference", default=None,
                   help="reference .npz (mu/sigma or images) or image folder: also compute FID")
    p.add_argument("--inception", default=None, help="Inception TorchScript for --reference (see tensorar fid)")
    add_device_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def check_outputs_and_reference(args) -> None:
    """Refuse what would only fail after sampling: --out or --npz in the way, a missing --reference or
    Inception network."""
    from ..evaluation.fid import find_inception_weights

    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file: --out names the folder for the PNGs (the .npz is "
                              f"written next to it, or to --npz)")
    npz = args.npz if args.npz is not None else args.out.with_name(args.out.name + ".npz")
    if npz.is_dir():
        raise IsADirectoryError(f"{'--npz' if args.npz is not None else 'the .npz'} {npz} is a folder; "
                                f"pass --npz FILE.npz")
    if args.reference:
        if not Path(args.reference).exists():
            raise FileNotFoundError(f"--reference {args.reference}: no such file or folder")
        find_inception_weights(args.inception)


def run(args) -> int:
    import torch.distributed as dist

    from ..evaluation import compute_fid, pack_npz, sample_images

    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_size is not None and args.eval_size < 1:
        raise ValueError(f"--eval-size must be >= 1, got {args.eval_size}")
    if args.cfg_interval < -1:
        raise ValueError(f"--cfg-interval must be -1 (guide every token) or a number of tokens >= 0, "
                         f"got {args.cfg_interval}")
    check_sampling_flags(args)
    check_outputs_and_reference(args)  # before drawing (50k images by default), not after
    device, dtype, rank, world, started = start_processes(args)
    try:
        wrapper, vq, grid, defaults, _, _, desc = load_model(args, device, dtype, fid_defaults=True)
        if wrapper.adapter.num_classes is None:
            raise ValueError("sample-npz draws class-conditional images; this model has no classes")
        settings = {**sampling_settings(args, defaults), "cfg_interval": args.cfg_interval}
        if rank == 0:
            print(f"sampling {args.num_samples} images from {desc} on {world} process(es) into {args.out}; "
                  + ", ".join(f"{k}={v}" for k, v in settings.items()), file=sys.stderr)
        started_at = time.perf_counter()
        sample_images(wrapper, vq, args.out, num_samples=args.num_samples, batch_size=args.batch_size,
                      seed=args.seed, labels=args.labels, grid=grid, eval_size=args.eval_size, rank=rank,
                      world_size=world, progress=not args.no_progress, compile=args.compile,
                      extra_settings={"model": desc, "vq": args.vq, "dtype": str(next(wrapper.parameters()).dtype)},
                      barrier=dist.barrier if world > 1 else None, **settings)
        if world > 1:
            dist.barrier()
        elapsed = time.perf_counter() - started_at
        if rank == 0:
            print(f"sampling took {elapsed:.1f} s on {world} process(es) (this run's batches only: a resumed run "
                  "skips the finished ones)", file=sys.stderr)
            npz = pack_npz(args.out, args.npz, progress=not args.no_progress)
            print(f"wrote {npz} ({args.num_samples} images)")
            if args.reference:
                fid = compute_fid(npz, args.reference, inception=args.inception, device=device,
                                  progress=not args.no_progress)
                result = {"fid": fid, "samples": str(npz), "reference": str(args.reference),
                          "num_samples": args.num_samples, "model": desc, **settings}
                (args.out / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
                print(f"FID {fid:.3f} against {args.reference} (written to {args.out / 'fid.json'})")
    finally:
        if started:
            dist.destroy_process_group()
    return 0
