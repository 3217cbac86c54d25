"""Diagnose draft leakage and auxiliary-slot cost: held-out per-slot losses after fine-tuning the demo base.

For each variant (noise schedule x slot weights) the demo's plain base model is fine-tuned with
TensorAR for `--steps` steps, then its per-slot cross-entropy on the held-out digits is measured
twice: with clean drafts (eval mode) and with drafts noised as in training. A slot-0 loss far below
plain fine-tuning's with clean drafts means the model copies the next token's draft from its input.

    python benchmarks/leakage.py --steps 200      # ~3 min on 2 CPU cores; needs the `bench` extra
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tensorar_plugin import TensorARWrapper, noise

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-json", type=Path, default=ROOT / "benchmarks/results/leakage.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    td = _module("train_demo", ROOT / "examples/train_demo.py")
    quality = _module("quality", ROOT / "benchmarks/quality.py")

    data = td.load_mnist_split(0)
    train_x, train_y = td.digits_to_tensor(data["train_x"]), torch.from_numpy(data["train_y"])
    test_x, test_y = td.digits_to_tensor(data["test_x"]), torch.from_numpy(data["test_y"])
    tok = quality.load_tokenizer(quality.demo_path())
    train_tokens, test_tokens = td.tokenize(tok, train_x), td.tokenize(tok, test_x)
    base = td.load_base(ROOT / "benchmarks/results/demo_base")
    fit = dict(steps=args.steps, batch=48, lr=1e-3, seed=args.seed, log_every=0)
    noise.SCHEDULES.setdefault("all", lambda u: torch.ones_like(u))  # drafts carry no information

    rows = []
    torch.manual_seed(args.seed)
    plain = copy.deepcopy(base).train()
    td.fit(td.plain_loss_fn(plain, train_tokens, train_y), plain.parameters(), len(train_tokens), **fit)
    with torch.no_grad():
        logits, _ = plain.eval()(test_tokens[:, :-1], test_y)
        plain_loss = F.cross_entropy(logits[:, plain.cls_token_num - 1:].reshape(-1, logits.shape[-1]),
                                     test_tokens.reshape(-1)).item()
    rows.append({"variant": "plain fine-tuning", "slot0_clean": plain_loss})
    print(f"plain fine-tuning: held-out loss {plain_loss:.3f}")

    for schedule in ("exponential", "all", "adaptive"):
        for weights in (None, [1.0, 0.1, 0.1, 0.1]):
            torch.manual_seed(args.seed)
            wrapper = TensorARWrapper(copy.deepcopy(base), window=4, noise_schedule=schedule,
                                      slot_weights=weights).train()
            td.fit(td.tensorar_loss_fn(wrapper, train_tokens, train_y, args.seed), wrapper.parameters(),
                   len(train_tokens), **fit)
            with torch.no_grad():
                clean = wrapper.eval()(test_tokens, test_y).slot_losses
                wrapper.train()
                wrapper.base_model.eval()  # training noise on the drafts, no dropout
                noised = wrapper(test_tokens, test_y, generator=torch.Generator().manual_seed(0)).slot_losses
            row = {"variant": f"{schedule} noise, slot weights {weights or 'uniform'}",
                   "slot_losses_clean": clean.tolist(), "slot_losses_noised": noised.tolist(),
                   "slot0_clean": clean[0].item(), "slot0_noised": noised[0].item()}
            rows.append(row)
            print(f"{row['variant']:48} slot-0 loss clean drafts {row['slot0_clean']:.3f}, "
                  f"training-noised drafts {row['slot0_noised']:.3f}")
    result = {"steps": args.steps, "seed": args.seed, "rows": rows}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out_json}")
    return result


if __name__ == "__main__":
    main()
