"""Training memory and step time: the default loss vs `recompute_logits` (`forward(return_logits=False)`).

TensorAR's output decoder gives every position `k` logits, so a training step holds `[B, T, k, V]` float32
logits (and their log-softmax) where the base model holds `[B, T, V]`. `return_logits=False` computes the
same loss one slot at a time and recomputes the head in the backward pass. Each setting runs in its own
process (one training step: forward, backward, AdamW update), so the peaks do not mix:

    python benchmarks/memory.py --device cpu                        # CPU: peak RSS, GPT-B, batch 4
    python benchmarks/memory.py --device cuda --models GPT-B GPT-L --batch-size 32   # GPU: peak allocated

On CUDA the peak is `torch.cuda.max_memory_allocated()`; on CPU the process's peak resident memory. Both
are reported above what the process held before the measured step (weights and the optimizer's state, made
by a warm-up step; on CPU after handing freed memory back to the OS): what the step adds, activations and
gradients. CPU figures vary by some tens of MiB between runs. Random weights; bf16 autocast by default.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from tensorar_plugin import TensorARWrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import new_llamagen  # noqa: E402  (the model presets speed.py measures)

MODES = {"default": True, "recompute_logits": False}  # mode -> forward's return_logits


def _release_free_memory() -> None:
    """Hand memory that glibc keeps after frees back to the OS, so that resident memory measured next counts
    only live allocations (else a step reuses the warm-up's freed pages without growing, and reads low)."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def _rss_bytes() -> int:
    """Resident memory now (Linux /proc; 0 elsewhere, where only the peak is known)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure(model_name: str, mode: str, batch: int, window: int, device: str, precision: str, steps: int,
            draft_source: str = "noise") -> dict:
    """One process, one setting: the peak memory of a training step above what it starts from (weights and
    optimizer state), i.e. activations and gradients, and the mean time of `steps` more steps."""
    torch.manual_seed(0)
    with torch.device(device):
        base = new_llamagen(model_name)
    wrapper = TensorARWrapper(base, window=window, draft_source=draft_source).train()
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-5)
    length = base.config.block_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.config.vocab_size, (batch, length), generator=gen).to(device)
    labels = torch.randint(0, base.config.num_classes, (batch,), generator=gen).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> float:
        with autocast:
            out = wrapper(tokens, labels, validate=False, return_logits=MODES[mode])
        loss = out.loss
        del out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    cuda = torch.device(device) if device.startswith("cuda") else None
    step()  # warm-up: creates the optimizer's state, so the measured step is a steady-state one
    if cuda:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        before = torch.cuda.memory_allocated(cuda)
    else:
        _release_free_memory()
        before = _rss_bytes()
    loss = step()
    if cuda:
        torch.cuda.synchronize(cuda)
        peak = torch.cuda.max_memory_allocated(cuda) - before
    else:
        peak = _peak_rss_bytes() - before
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(cuda)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "step_s": sum(times) / len(times) if times else None, "loss": loss,
            "params": sum(p.numel() for p in wrapper.parameters()), "baseline_known": bool(cuda) or before > 0}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["GPT-B"],
                        help="LlamaGen presets (GPT-B, GPT-L, ...), or tiny / micro")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=4, help="TensorAR window k")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--draft-source", choices=("noise", "model"), default="noise",
                        help="TensorAR's draft source (model: one more no-grad forward draws the drafts)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", default="benchmarks/results/memory.json", help="where to write the results")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # a child process: one measurement, printed as JSON
        model_name, mode = args.worker
        print(json.dumps(measure(model_name, mode, args.batch_size, args.window, args.device, args.precision,
                                 args.steps, args.draft_source)))
        return 0
    rows = []
    passthrough = ["--batch-size", str(args.batch_size), "--window", str(args.window), "--device", args.device,
                   "--precision", args.precision, "--steps", str(args.steps), "--threads", str(args.threads),
                   "--draft-source", args.draft_source]
    print(f"{'model':8} {'batch':>5} {'mode':>18} {'peak MiB':>10} {'step s':>8} {'loss':>8}")
    for model_name in args.models:
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, *passthrough, "--worker", model_name, mode],
                                   capture_output=True, text=True)
            if child.returncode:
                sys.stderr.write(child.stderr)
                raise SystemExit(f"{model_name} {mode}: the measuring process failed (exit code {child.returncode})")
            row = {"model": model_name, "batch": args.batch_size, "mode": mode,
                   **json.loads(child.stdout.strip().splitlines()[-1])}
            rows.append(row)
            step = f"{row['step_s']:.3f}" if row["step_s"] is not None else "-"
            print(f"{model_name:8} {args.batch_size:>5} {mode:>18} {row['peak_bytes'] / 2**20:>10.0f} {step:>8} "
                  f"{row['loss']:>8.4f}")
        default, lean = rows[-2], rows[-1]
        saved = (default["peak_bytes"] - lean["peak_bytes"]) / 2**20
        time_ratio = (lean["step_s"] / default["step_s"]) if default["step_s"] and lean["step_s"] else None
        print(f"  {model_name}: recompute_logits peaks {saved:.0f} MiB lower"
              + (f" ({saved * 2**20 / default['peak_bytes']:.0%} of the step's memory)" if default["peak_bytes"] > 0
                 else "")
              + (f", at {time_ratio:.2f}x the step time" if time_ratio else ""))
    if not all(row["baseline_known"] for row in rows):
        print("note: no /proc here: the CPU figures are the process's whole peak resident memory")
    device_name = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
                   else platform.processor() or "cpu")
    meta = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
            "python": platform.python_version(), "precision": args.precision, "window": args.window,
            "draft_source": args.draft_source,
            "peak": "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS",
            "threads": torch.get_num_threads(),
            "command": "python benchmarks/memory.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"device: {device_name} ({args.device}), torch {torch.__version__}, {args.precision}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
