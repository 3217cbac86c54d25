"""Evaluation at scale: sample many images into an ADM-evaluator `.npz`, and compute FID offline.

* `samples`: `sample_images` (resumable PNG folder, split over processes) and `pack_npz`.
* `fid`: `InceptionFeatures` (TF's FID Inception, not shipped), `compute_fid`, `frechet_distance`.

`tensorar sample-npz` and `tensorar fid` are the command-line entry points (docs/evaluation.md).
"""

from .fid import (
    InceptionFeatures,
    activation_statistics,
    compute_fid,
    find_inception_weights,
    frechet_distance,
    load_statistics,
    save_statistics,
    tf_bilinear_resize,
)
from .samples import batch_seed, eval_labels, pack_npz, sample_images

__all__ = ["InceptionFeatures", "activation_statistics", "compute_fid", "find_inception_weights", "frechet_distance",
           "load_statistics", "save_statistics", "tf_bilinear_resize", "batch_seed", "eval_labels", "pack_npz",
           "sample_images"]
