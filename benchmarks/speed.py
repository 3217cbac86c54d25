"""Side-by-side sampling speed: our plain sampler vs TensorAR (and optionally LlamaGen's `generate()`).

Every row is measured in the same process on the same model with the same settings, so the ratios
are what matter; absolute times depend on the machine (quoted in the output).

    python benchmarks/speed.py                       # CPU, tiny model (the issue-4 check: TensorAR <= 1.3x)
    python benchmarks/speed.py --device cuda --models GPT-B GPT-L GPT-XL --batch-sizes 1 32 --dtype bf16 \
        --compile-ours --reference /path/to/LlamaGen --compile   # the GPU table of docs/benchmarks.md

Random weights (the head is re-initialised so sampling is not uniform); cfg 2.0, top-k off. The JSON is
rewritten after every row, so a run cut short keeps what it measured; `--append` merges into an existing
file (one model per call on a machine with a per-command time limit). `benchmarks/plot_speed.py` draws it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
from torch._dynamo.utils import counters
from torch._inductor.graph import GraphLowering

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.generation import _own_code
from tensorar_plugin.models.llamagen import LLAMAGEN_PRESETS, LlamaGen, LlamaGenConfig, build_llamagen

PRESETS = {
    "tiny": dict(dim=256, n_layer=8, n_head=8, vocab_size=1024, block_size=256, num_classes=10, multiple_of=64),
    "micro": dict(dim=32, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10, multiple_of=16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: issue 8's targets: TensorAR vs LlamaGen compiled, TensorAR vs our plain sampler, plain vs the weight-read floor
TARGETS = {"speedup_vs_llamagen_compiled": 3.0, "tensorar_over_plain": 1.10, "plain_over_floor": 2.5}
#: a kernel launch in inductor's generated wrapper code: its own C++ or Triton kernels, extern matmuls, aten fallbacks
KERNEL_CALL = re.compile(r"\b(?:cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\(")


def new_llamagen(name: str) -> LlamaGen:
    """A freshly initialised LlamaGen: one of `PRESETS` (tiny test sizes) or a LlamaGen preset (GPT-B, GPT-L, ...)."""
    return LlamaGen(LlamaGenConfig(**PRESETS[name])) if name in PRESETS else build_llamagen(name)


def make_model(name: str, device: str, dtype: torch.dtype) -> LlamaGen:
    torch.manual_seed(0)
    with torch.device(device):
        model = new_llamagen(name)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(dtype).eval()


def make_wrapper(model: LlamaGen, window: int) -> TensorARWrapper:
    """TensorAR around `model` with non-zero new parts, so the benchmark measures their real work."""
    wrapper = TensorARWrapper(model, window=window).eval()
    torch.manual_seed(1)
    for module in wrapper.new_modules().values():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return wrapper


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    """Seconds per call: wall clock on GPUs; on CPUs the process's CPU time, which other processes
    sharing the machine do not inflate (run with --threads 1 so it equals the work done)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    fn()  # warm-up (and compilation, and CUDA-graph recording)
    sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return times


def count_kernel_calls(code: str) -> int:
    """Kernel launches in one graph's generated code: in its `call` and, on CUDA, in the partition functions
    defined above it (kernel definitions do not match `KERNEL_CALL`; the benchmark harness below is cut off)."""
    end = min((i for i in (code.find("\ndef get_args"), code.find("\ndef benchmark_compiled_module")) if i >= 0),
              default=len(code))
    return len(KERNEL_CALL.findall(code[:end]))


def decode_step_kernels(fn) -> int | None:
    """Run `fn` once and count the kernel launches of the largest graph inductor compiled meanwhile: for a
    sampler's first call, its decode step, i.e. what a CUDA graph replays per token. At batch 1 a step's
    time grows with this count rather than with the bytes read. None when nothing was compiled."""
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        fn()
    return max(map(count_kernel_calls, codes), default=None)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted once each)."""
    n = 256 * 2**20 if device.startswith("cuda") else 32 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copies = 10  # per timed call: one 256 MiB copy on an H100 (~0.2 ms) is not long against timer and sync overhead

    def copy_many():
        for _ in range(copies):
            dst.copy_(src)

    best = min(timed(copy_many, device, 5))
    return 2 * n * copies / best


def compile_options(args) -> dict | bool:
    if not args.compile_ours:
        return False
    if args.compile_backend:
        return {"backend": args.compile_backend}
    return {"mode": args.compile_mode} if args.compile_mode else True


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"],
                        help=f"{' / '.join(PRESETS)} or LlamaGen presets (GPT-B GPT-L GPT-XL ...)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    parser.add_argument("--window", type=int, default=4, help="TensorAR window k")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else 0,
                        help="torch CPU threads (0 keeps torch's default); 1 makes CPU timings robust to load")
    parser.add_argument("--reference", help="path of a LlamaGen checkout: also time its own generate()")
    parser.add_argument("--compile", action="store_true", help="also time LlamaGen's compiled generate()")
    parser.add_argument("--compile-ours", action="store_true", help="compile our decode step (generate(compile=))")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode for --compile-ours ('' for the default mode)")
    parser.add_argument("--compile-backend", default="", help="torch.compile backend for --compile-ours "
                        "(e.g. aot_eager, to check tracing without a compiler); overrides --compile-mode")
    parser.add_argument("--check-dtype", default="fp64", choices=list(DTYPES),
                        help="dtype of the fast-vs-eager token check (fp64: float noise cannot flip an argmax)")
    parser.add_argument("--check-models", nargs="*", default=None,
                        help="models to run the token check on (default: the first of --models; none: skip)")
    parser.add_argument("--json", default="benchmarks/results/speed.json", help="where to write the results")
    parser.add_argument("--append", action="store_true",
                        help="merge into an existing --json (rows of the same model are replaced)")
    parser.add_argument("--llamagen-caches", choices=("reuse", "as-shipped"), default="reuse",
                        help="LlamaGen's generate() allocates new KV caches on every call, so its CUDA graphs are "
                             "re-recorded per call; 'reuse' (default, the stronger baseline) keeps caches of the "
                             "same shape, as a line LlamaGen left commented out in setup_caches does")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in PRESETS and m not in LLAMAGEN_PRESETS]
    if unknown:
        parser.error(f"--models: unknown model(s) {unknown}")
    if args.check_models is None:
        args.check_models = args.models[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    bandwidth = copy_bandwidth(args.device)
    meta = {"device": device_name, "device_type": args.device, "torch": torch.__version__, "dtype": args.dtype,
            "cfg_scale": args.cfg_scale, "window": args.window, "threads": torch.get_num_threads(),
            "copy_bandwidth_GBps": bandwidth / 1e9, "python": sys.version.split()[0],
            "compile_ours": compile_options(args), "llamagen_caches": args.llamagen_caches,
            "command": shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])}
    out = Path(args.json)
    rows, checks = [], {}
    if args.append and not out.exists():  # a fresh file would silently drop the rows the user meant to keep
        raise SystemExit(f"--append: {out} does not exist (run without --append first, or merge separate files "
                         f"with benchmarks/plot_speed.py A.json B.json --merged-json OUT.json)")
    if args.append:
        previous = json.loads(out.read_text())
        rows, checks = previous.get("rows", []), previous.get("checks", {})
        rows = [r for r in rows if r["model"] not in args.models]

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks,
                                   "targets": evaluate_targets(rows, args.window)}, indent=2) + "\n")

    for name in args.models:
        torch._dynamo.reset()  # fresh compile caches per model (LlamaGen's compiled path hits the recompile cap)
        model = make_model(name, args.device, dtype)
        wrapper = make_wrapper(model, args.window)
        tokens = model.block_size
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = param_bytes / bandwidth * tokens
        for batch in args.batch_sizes:
            cond = torch.arange(batch, device=args.device) % model.num_classes
            result = {"model": name, "batch": batch, "tokens": tokens, "floor_s": floor, "param_bytes": param_bytes}
            result.update(measure(args, model, wrapper, cond))
            rows.append(result)
            print_row(result, args.window, args.device.startswith("cuda"))
            save()
        del model, wrapper
        if name in args.check_models:
            checks[name] = fast_path_check(args, name, min(args.batch_sizes))
            print(f"fast path vs eager ({args.check_dtype}, batch {min(args.batch_sizes)}): {checks[name]}")
            save()

    print_targets(evaluate_targets(rows, args.window))
    print(f"\ndevice: {device_name} ({args.device}), torch {torch.__version__}, {args.dtype}; wrote {out}")
    return 0


def measure(args, model: LlamaGen, wrapper: TensorARWrapper, cond: torch.Tensor) -> dict:
    """Median seconds per batch of every sampler, run one after the other on the same model.

    A sampler that fails is reported under `errors` and the others still run."""
    gen = torch.Generator(device=args.device)
    compiled = compile_options(args)
    runs = {
        "plain": lambda: sample_plain(model, cond, cfg_scale=args.cfg_scale, generator=gen.manual_seed(0),
                                      compile=compiled),
        f"tensorar_k{args.window}": lambda: wrapper.generate(cond, cfg_scale=args.cfg_scale,
                                                             generator=gen.manual_seed(0), compile=compiled),
    }
    if args.reference:
        runs.update(reference_runs(args, model, cond))
    # samplers whose first call compiles a decode step with inductor (its generated code is counted)
    ours_inductor = compiled and args.compile_backend in ("", "inductor")
    inductor = {"llamagen_compiled"} | ({"plain", f"tensorar_k{args.window}"} if ours_inductor else set())
    result: dict = {"errors": {}, "cudagraph_skips": {}, "kernels_per_step": {}}
    skips = counters["inductor"]
    for label, fn in runs.items():
        before = skips["cudagraph_skips"]
        try:
            with torch.inference_mode():
                if label in inductor:
                    result["kernels_per_step"][label] = decode_step_kernels(fn)
                result[label] = statistics.median(timed(fn, args.device, args.repeats))
        except Exception as error:  # noqa: BLE001 - report it in the table and go on with the other samplers
            traceback.print_exc()
            result["errors"][label] = f"{type(error).__name__}: {error}"[:500]
        # graphs inductor compiled but did not capture as CUDA graphs (a silent slow path under reduce-overhead)
        result["cudagraph_skips"][label] = skips["cudagraph_skips"] - before
    return result


def fast_path_check(args, name: str, batch: int) -> dict:
    """Does the fast (compiled) path pick exactly the eager path's tokens? Greedy plain, greedy TensorAR
    (argmax drafts) and sampled TensorAR from the same generator, run in `--check-dtype`."""
    if not compile_options(args):
        return {"skipped": "needs --compile-ours"}
    model = make_model(name, args.device, DTYPES[args.check_dtype])
    wrapper = make_wrapper(model, args.window)
    cond = torch.arange(batch, device=args.device) % model.num_classes
    compiled = compile_options(args)

    def seeded():
        return torch.Generator(device=args.device).manual_seed(0)

    cases = {
        "plain_greedy": lambda **kw: sample_plain(model, cond, cfg_scale=args.cfg_scale, greedy=True, **kw),
        "tensorar_greedy": lambda **kw: wrapper.generate(cond, cfg_scale=args.cfg_scale, greedy=True,
                                                         draft="argmax", **kw),
        "tensorar_sampled": lambda **kw: wrapper.generate(cond, cfg_scale=args.cfg_scale, generator=seeded(), **kw),
    }
    report = {}
    with torch.inference_mode():
        for label, run in cases.items():
            try:
                fast, eager = run(compile=compiled), run()
                same = fast == eager
                report[label] = {"tokens_equal": bool(same.all()), "fraction_equal": same.float().mean().item()}
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                report[label] = {"error": f"{type(error).__name__}: {error}"[:500]}
    return report


def evaluate_targets(rows: list[dict], window: int) -> list[dict]:
    """Each target of issue 8 that the rows can speak to, with the measured value and PASS/FAIL."""
    key, verdicts = f"tensorar_k{window}", []
    for row in rows:
        ours, plain = row.get(key), row.get("plain")
        where = f"{row['model']} batch {row['batch']}"
        reference = row.get("llamagen_compiled")
        if ours and reference and row["model"] in ("GPT-B", "GPT-L"):
            value = reference / ours
            verdicts.append({"target": f"TensorAR >= 3x faster than LlamaGen compiled ({where})",
                             "value": value, "pass": value >= TARGETS["speedup_vs_llamagen_compiled"]})
        if ours and plain:
            value = ours / plain
            verdicts.append({"target": f"TensorAR <= 1.10x our plain sampler ({where})",
                             "value": value, "pass": value <= TARGETS["tensorar_over_plain"]})
        if plain and row["model"] == "GPT-L" and row["batch"] == 1:
            value = plain / row["floor_s"]
            verdicts.append({"target": f"plain <= 2.5x the weight-read floor ({where})",
                             "value": value, "pass": value <= TARGETS["plain_over_floor"]})
    return verdicts


def print_row(row: dict, window: int, cuda: bool = False) -> None:
    key = f"tensorar_k{window}"
    if not getattr(print_row, "header", False):
        print(f"{'model':8} {'batch':>5} {'plain ms':>10} {'tensorar ms':>12} {'ratio':>6} {'tok/s tensorar':>15} "
              f"{'floor ms':>9} {'plain/floor':>11}  LlamaGen")
        print_row.header = True
    plain, tar = row.get("plain"), row.get(key)

    def ms(value):
        return f"{value * 1e3:.1f}" if value else "failed"

    ratio = f"{tar / plain:.2f}" if plain and tar else "-"
    per_second = f"{row['batch'] * row['tokens'] / tar:.0f}" if tar else "-"
    over_floor = f"{plain / row['floor_s']:.2f}" if plain else "-"
    others = "  ".join(f"{k[9:]}={v * 1e3:.1f}ms (x{v / tar:.2f} of tensorar)" for k, v in row.items()
                       if k.startswith("llamagen_") and tar)
    print(f"{row['model']:8} {row['batch']:>5} {ms(plain):>10} {ms(tar):>12} {ratio:>6} {per_second:>15} "
          f"{row['floor_s'] * 1e3:>9.1f} {over_floor:>11}  {others}")
    kernels = {label: n for label, n in row.get("kernels_per_step", {}).items() if n}
    if kernels:
        print("         kernel launches per decode step: " + ", ".join(f"{k}={n}" for k, n in kernels.items()))
    for label, error in row.get("errors", {}).items():
        print(f"         {label} failed: {error.splitlines()[0][:160]}")
    if cuda:  # on a CPU nothing is captured anyway
        for label, count in row.get("cudagraph_skips", {}).items():
            if count:
                print(f"         {label}: {count} compiled graph(s) ran without CUDA graphs (TORCH_LOGS=cudagraphs)")


def print_targets(verdicts: list[dict]) -> None:
    if verdicts:
        print("\ntargets:")
    for verdict in verdicts:
        print(f"  {'PASS' if verdict['pass'] else 'FAIL'}  {verdict['target']}: {verdict['value']:.2f}")


def _reusing_setup_caches(ref):
    """LlamaGen's `setup_caches`, skipped when caches of the same batch, length and dtype exist: reusing them
    keeps the compiled step's CUDA graphs valid across `generate()` calls (stale entries are masked, and
    the class-conditional mask stays causal)."""
    original = ref.setup_caches

    def setup_caches(max_batch_size, max_seq_length, dtype):
        cache = ref.layers[0].attention.kv_cache
        same = (cache is not None and getattr(ref, "max_batch_size", None) == max_batch_size
                and getattr(ref, "max_seq_length", -1) >= max_seq_length and cache.k_cache.dtype == dtype)
        if not same:
            original(max_batch_size, max_seq_length, dtype)

    return setup_caches


def reference_runs(args, model: LlamaGen, cond: torch.Tensor) -> dict:
    """LlamaGen's own generate() on the same weights (eager, and compiled when asked)."""
    sys.path.insert(0, args.reference)
    from autoregressive.models import generate as ref_generate
    from autoregressive.models import gpt as ref_gpt

    ref = model.__dict__.get("_llamagen_reference")  # built once per model, not once per batch size
    if ref is None:
        with torch.device(args.device):  # built where it runs: a GPT-XL built on a CPU takes tens of seconds
            ref = ref_gpt.Transformer(ref_gpt.ModelArgs(**{k: getattr(model.config, k) for k in (
                "dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of")}))
        ref.load_state_dict(model.state_dict(), strict=True)
        ref = ref.to(args.device, model.tok_embeddings.weight.dtype).eval()
        if args.llamagen_caches == "reuse":
            ref.setup_caches = _reusing_setup_caches(ref)
        model.__dict__["_llamagen_reference"] = ref
    steps = model.block_size
    runs = {"llamagen_eager": lambda: ref_generate.generate(ref, cond, steps, cfg_scale=args.cfg_scale)}
    if args.compile:
        eager = ref_generate.decode_one_token
        # LlamaGen's sample_c2i.py compiles the whole model; compiling decode_one_token (the model call AND its
        # sampling) in reduce-overhead mode is the stronger baseline. A fresh code copy per model and batch
        # size, as our steps get, so neither side runs a graph recompiled with a symbolic batch (or hits the
        # recompile cap)
        compiled = torch.compile(_own_code(eager), mode="reduce-overhead", fullgraph=True)

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
