"""Side-by-side sampling speed: our plain sampler vs TensorAR (and optionally LlamaGen's `generate()`).

Every row is measured in the same process on the same model with the same settings, so the ratios
are what matter; absolute times depend on the machine (quoted in the output).

    python benchmarks/speed.py                       # CPU, tiny model (the issue-4 check: TensorAR <= 1.3x)
    python benchmarks/speed.py --device cuda --models GPT-B GPT-L GPT-XL --batch-sizes 1 32 --dtype bf16 \
        --reference /path/to/LlamaGen --compile       # the GPU table of docs/benchmarks.md

Random weights (the head is re-initialised so sampling is not uniform); cfg 2.0, top-k off.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.models.llamagen import LlamaGen, LlamaGenConfig, build_llamagen

TINY = dict(dim=256, n_layer=8, n_head=8, vocab_size=1024, block_size=256, num_classes=10, multiple_of=64)


def make_model(name: str, device: str, dtype: torch.dtype) -> LlamaGen:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaGen(LlamaGenConfig(**TINY)) if name == "tiny" else build_llamagen(name)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    """Seconds per call: wall clock on GPUs; on CPUs the process's CPU time, which other processes
    sharing the machine do not inflate (run with --threads 1 so it equals the work done)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    fn()  # warm-up (and compilation)
    sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return times


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted once each)."""
    n = 256 * 2**20 if device.startswith("cuda") else 32 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), device, 5))
    return 2 * n / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], help="tiny or LlamaGen presets (GPT-B ...)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--window", type=int, default=4, help="TensorAR window k")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else 0,
                        help="torch CPU threads (0 keeps torch's default); 1 makes CPU timings robust to load")
    parser.add_argument("--reference", help="path of a LlamaGen checkout: also time its own generate()")
    parser.add_argument("--compile", action="store_true", help="also time LlamaGen's compiled generate()")
    parser.add_argument("--compile-ours", action="store_true", help="compile our decode step (generate(compile=))")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode for --compile-ours")
    parser.add_argument("--json", default="benchmarks/results/speed.json", help="where to write the results")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    bandwidth = copy_bandwidth(args.device)
    rows = []
    for name in args.models:
        model = make_model(name, args.device, dtype)
        wrapper = TensorARWrapper(model, window=args.window).eval()
        for module in wrapper.new_modules().values():  # non-zero heads: measure the real work
            for p in module.parameters():
                torch.nn.init.normal_(p, std=0.02)
        tokens = model.block_size
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = param_bytes / bandwidth * tokens
        for batch in args.batch_sizes:
            cond = torch.arange(batch, device=args.device) % model.num_classes
            result = {"model": name, "batch": batch, "tokens": tokens, "floor_s": floor}
            result.update(measure(args, model, wrapper, cond))
            rows.append(result)
            print_row(result, args.window)

    meta = {"device": device_name, "device_type": args.device, "torch": torch.__version__, "dtype": args.dtype,
            "cfg_scale": args.cfg_scale, "window": args.window, "threads": torch.get_num_threads(),
            "copy_bandwidth_GBps": bandwidth / 1e9, "python": sys.version.split()[0]}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\ndevice: {device_name} ({args.device}), torch {torch.__version__}, {args.dtype}; wrote {out}")
    return 0


def measure(args, model: LlamaGen, wrapper: TensorARWrapper, cond: torch.Tensor) -> dict[str, float]:
    """Median seconds per batch of every sampler, run one after the other on the same model."""
    gen = torch.Generator(device=args.device)
    compile_opts = {"mode": args.compile_mode} if args.compile_ours else False
    runs = {
        "plain": lambda: sample_plain(model, cond, cfg_scale=args.cfg_scale, generator=gen.manual_seed(0),
                                      compile=compile_opts),
        f"tensorar_k{args.window}": lambda: wrapper.generate(cond, cfg_scale=args.cfg_scale,
                                                             generator=gen.manual_seed(0), compile=compile_opts),
    }
    if args.reference:
        runs.update(reference_runs(args, model, cond))
    result = {}
    for label, fn in runs.items():
        with torch.inference_mode():
            result[label] = statistics.median(timed(fn, args.device, args.repeats))
    if compile_opts:  # the fast path must not change a single token (greedy decoding, argmax drafts)
        greedy = dict(cfg_scale=args.cfg_scale, greedy=True, draft="argmax")
        with torch.inference_mode():
            result["fast_path_tokens_equal"] = float(torch.equal(wrapper.generate(cond, compile=compile_opts, **greedy),
                                                                 wrapper.generate(cond, **greedy)))
    return result


def print_row(row: dict, window: int) -> None:
    key = f"tensorar_k{window}"
    if not getattr(print_row, "header", False):
        print(f"{'model':8} {'batch':>5} {'plain ms':>10} {'tensorar ms':>12} {'ratio':>6} {'tok/s plain':>12} "
              f"{'floor ms':>9} {'plain/floor':>11}  others")
        print_row.header = True
    plain, tar = row["plain"], row[key]
    others = "  ".join(f"{k}={v * 1e3:.1f}ms (x{v / tar:.2f} of tensorar)" for k, v in row.items()
                       if k.startswith("llamagen"))
    print(f"{row['model']:8} {row['batch']:>5} {plain * 1e3:>10.1f} {tar * 1e3:>12.1f} {tar / plain:>6.2f} "
          f"{row['batch'] * row['tokens'] / plain:>12.0f} {row['floor_s'] * 1e3:>9.1f} "
          f"{plain / row['floor_s']:>11.2f}  {others}")


def reference_runs(args, model: LlamaGen, cond: torch.Tensor) -> dict:
    """LlamaGen's own generate() on the same weights (eager, and compiled when asked)."""
    sys.path.insert(0, args.reference)
    from autoregressive.models import generate as ref_generate
    from autoregressive.models import gpt as ref_gpt

    ref = ref_gpt.Transformer(ref_gpt.ModelArgs(**{k: getattr(model.config, k) for k in (
        "dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of")}))
    ref.load_state_dict(model.state_dict(), strict=True)
    ref = ref.to(args.device, model.tok_embeddings.weight.dtype).eval()
    steps = model.block_size
    runs = {"llamagen_eager": lambda: ref_generate.generate(ref, cond, steps, cfg_scale=args.cfg_scale)}
    if args.compile:
        eager = ref_generate.decode_one_token
        compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=True)

        def run_compiled():
            ref_generate.decode_one_token = compiled  # generate() looks the step function up by name
            try:
                return ref_generate.generate(ref, cond, steps, cfg_scale=args.cfg_scale)
            finally:
                ref_generate.decode_one_token = eager

        runs["llamagen_compiled"] = run_compiled
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
