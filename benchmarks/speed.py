"""Side-by-side sampling speed: our plain sampler vs TensorAR (and optionally LlamaGen's `generate()`).

Every row is measured in the same process on the same model with the same settings, so the ratios
are what matter; absolute times depend on the machine (quoted in the output).

    python benchmarks/speed.py                       # CPU, tiny model (the issue-4 check: TensorAR <= 1.3x)
    python benchmarks/speed.py --device cuda --models GPT-B GPT-L GPT-XL --batch-sizes 1 32 --dtype bf16 \
        --compile-ours --reference /path/to/LlamaGen --compile   # the GPU table of docs/benchmarks.md

Random weights (the head is re-initialised so sampling is not uniform); cfg 2.0, top-k off. The JSON is
rewritten after every row, so a run cut short keeps what it measured; `--append` merges into an existing
file (one model per call on a machine with a per-command time limit). `benchmarks/plot_speed.py` draws it.

Compilation dominates a GPU run (one inductor compile per sampler, model and batch size). `--precompile-jobs N`
first compiles every one of them in N parallel worker processes, which fill inductor's on-disk caches; the
timing process then loads each compiled step from the cache instead of compiling it. Timings are unchanged
(the first call of every sampler is a warm-up that is never timed); only the wall time of the run shrinks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
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
#: LlamaGen's compiled samplers: the one its sample_c2i.py ships (the issue's baseline) and our stronger variant
REFERENCE_COMPILES = {"llamagen_sample_c2i": "as sample_c2i.py ships it",
                      "llamagen_compiled": "decode step compiled, caches reused"}
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


def timed(fn, device: str, repeats: int, warmup: bool = True) -> list[float]:
    """Seconds per call: wall clock on GPUs; on CPUs the process's CPU time, which other processes
    sharing the machine do not inflate (run with --threads 1 so it equals the work done)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    if warmup:  # compilation, CUDA-graph recording, allocator growth
        fn()
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
    parser.add_argument("--eager-repeats", type=int, default=None,
                        help="timed runs of LlamaGen's eager generate() (default: --repeats); seconds per call on "
                             "a GPU, so 1 saves device time")
    parser.add_argument("--precompile-jobs", type=int, default=0,
                        help="compile every sampler's decode step first, in this many parallel processes that fill "
                             "inductor's on-disk caches (0: compile in the timing process, one after the other)")
    parser.add_argument("--precompile-timeout", type=float, default=900.0,
                        help="seconds one precompile process may take before it is stopped (the timing process then "
                             "compiles that step itself)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no further model once the run has taken this long (the JSON names those skipped)")
    parser.add_argument("--precompile-task", nargs=4, metavar=("MODEL", "BATCH", "SAMPLER", "REPORT"),
                        help=argparse.SUPPRESS)  # one worker of --precompile-jobs
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in PRESETS and m not in LLAMAGEN_PRESETS]
    if unknown:
        parser.error(f"--models: unknown model(s) {unknown}")
    for name in ("repeats", "eager_repeats", "precompile_jobs"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "precompile_jobs" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'precompile_jobs' else 1}, got {value}")
    if args.check_models is None:
        args.check_models = args.models[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference:  # first, in workers too: any inductor settings it makes then hold for every compile
        import_reference(args.reference)
    if args.precompile_task:
        return precompile_worker(args)
    started = time.monotonic()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    bandwidth = copy_bandwidth(args.device)
    meta = {"device": device_name, "device_type": args.device, "torch": torch.__version__, "dtype": args.dtype,
            "cfg_scale": args.cfg_scale, "window": args.window, "threads": torch.get_num_threads(),
            "copy_bandwidth_GBps": bandwidth / 1e9, "python": sys.version.split()[0],
            "compile_ours": compile_options(args), "llamagen_caches": args.llamagen_caches,
            "command": shlex.join(["python", "benchmarks/speed.py", *argv])}
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

    precompiled = {}
    if args.precompile_jobs:
        precompiled, meta["precompile"] = precompile(args, argv)
        save()
    for name in args.models:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            meta.setdefault("skipped_models", []).append(name)
            print(f"{name}: not started, the run has taken more than --time-budget {args.time_budget:g} s")
            save()
            continue
        torch._dynamo.reset()  # fresh compile caches per model (LlamaGen's compiled path hits the recompile cap)
        model = make_model(name, args.device, DTYPES[args.dtype])
        wrapper = make_wrapper(model, args.window)
        tokens = model.block_size
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        floor = param_bytes / bandwidth * tokens
        for batch in args.batch_sizes:
            cond = torch.arange(batch, device=args.device) % model.num_classes
            result = {"model": name, "batch": batch, "tokens": tokens, "floor_s": floor, "param_bytes": param_bytes}
            result.update(measure(args, model, wrapper, cond, {k[2]: v for k, v in precompiled.items()
                                                              if k[:2] == (name, batch)}))
            rows.append(result)
            print_row(result, args.window, args.device.startswith("cuda"))
            save()
        del model, wrapper
        if name in args.check_models:
            checks[name] = fast_path_check(args, name, min(args.batch_sizes))
            print(f"fast path vs eager ({args.check_dtype}, batch {min(args.batch_sizes)}): {checks[name]}")
            save()

    meta["wall_s"] = time.monotonic() - started
    save()
    print_targets(evaluate_targets(rows, args.window))
    print(f"\ndevice: {device_name} ({args.device}), torch {torch.__version__}, {args.dtype}; "
          f"{meta['wall_s']:.0f} s; wrote {out}")
    return 0


def sampler_runs(args, model: LlamaGen, wrapper: TensorARWrapper, cond: torch.Tensor) -> dict:
    """Every sampler the run times, as a function that samples one batch (same model, settings and seed)."""
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
    return runs


def inductor_samplers(args) -> list[str]:
    """The samplers whose first call compiles a decode step with inductor (its generated code can be counted,
    and its compile cached)."""
    ours = bool(compile_options(args)) and args.compile_backend in ("", "inductor")
    labels = ["plain", f"tensorar_k{args.window}"] if ours else []
    return labels + (["llamagen_compiled", "llamagen_sample_c2i"] if args.reference and args.compile else [])


def measure(args, model: LlamaGen, wrapper: TensorARWrapper, cond: torch.Tensor,
            precompiled: dict | None = None) -> dict:
    """Median seconds per batch of every sampler, run one after the other on the same model.

    A sampler that fails is reported under `errors` and the others still run. `precompiled`: what the
    precompile workers reported for this model and batch (kernel counts a cache hit cannot show)."""
    precompiled = precompiled or {}
    runs = sampler_runs(args, model, wrapper, cond)
    inductor = set(inductor_samplers(args))
    result: dict = {"errors": {}, "cudagraph_skips": {}, "kernels_per_step": {}, "first_call_s": {},
                    "compile_cache": {}}
    for label, fn in runs.items():
        before = inductor_counts()
        repeats = (args.eager_repeats or args.repeats) if label == "llamagen_eager" else args.repeats
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                if label in inductor:  # a step loaded from the cache generates no code: its worker counted it
                    kernels = decode_step_kernels(fn)
                    result["kernels_per_step"][label] = kernels or precompiled.get(label, {}).get("kernels_per_step")
                else:
                    fn()
                sync(args.device)
                result["first_call_s"][label] = time.perf_counter() - start  # compile (or cache load) and one run
                # a compiled step's second call records its CUDA graphs (the first ran it as warm-up): untimed too
                result[label] = statistics.median(timed(fn, args.device, repeats, warmup=label in inductor))
        except Exception as error:  # noqa: BLE001 - report it in the table and go on with the other samplers
            traceback.print_exc()
            result["errors"][label] = f"{type(error).__name__}: {error}"[:500]
        # graphs inductor compiled but did not capture as CUDA graphs (a silent slow path under reduce-overhead)
        result["cudagraph_skips"][label] = inductor_counts()["cudagraph_skips"] - before["cudagraph_skips"]
        if label in inductor:
            result["compile_cache"][label] = cache_use_since(before)
    return result


def inductor_counts() -> dict[str, int]:
    """Inductor's running counts of graphs run without CUDA graphs and of FX-graph cache hits and misses."""
    return {key: counters["inductor"][key] for key in ("cudagraph_skips", "fxgraph_cache_hit", "fxgraph_cache_miss")}


def cache_use_since(before: dict[str, int]) -> dict[str, int]:
    """FX-graph cache hits and misses since `before` (an `inductor_counts()`): a precompiled step is a hit."""
    now = inductor_counts()
    return {"hits": now["fxgraph_cache_hit"] - before["fxgraph_cache_hit"],
            "misses": now["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]}


#: the fast-path token checks: greedy plain, greedy TensorAR (argmax drafts), sampled TensorAR
CHECK_CASES = ("plain_greedy", "tensorar_greedy", "tensorar_sampled")


def check_runs(args, name: str, batch: int) -> dict:
    """The checked samplers on a fresh `--check-dtype` model; each takes `compile=` (fast path or eager)."""
    model = make_model(name, args.device, DTYPES[args.check_dtype])
    wrapper = make_wrapper(model, args.window)
    cond = torch.arange(batch, device=args.device) % model.num_classes

    def seeded():
        return torch.Generator(device=args.device).manual_seed(0)

    return {
        "plain_greedy": lambda **kw: sample_plain(model, cond, cfg_scale=args.cfg_scale, greedy=True, **kw),
        "tensorar_greedy": lambda **kw: wrapper.generate(cond, cfg_scale=args.cfg_scale, greedy=True,
                                                         draft="argmax", **kw),
        "tensorar_sampled": lambda **kw: wrapper.generate(cond, cfg_scale=args.cfg_scale, generator=seeded(), **kw),
    }


def fast_path_check(args, name: str, batch: int) -> dict:
    """Does the fast (compiled) path pick exactly the eager path's tokens? Each of `CHECK_CASES`, run in
    `--check-dtype`, fast and eager from the same generator."""
    compiled = compile_options(args)
    if not compiled:
        return {"skipped": "needs --compile-ours"}
    report = {}
    with torch.inference_mode():
        for label, run in check_runs(args, name, batch).items():
            try:
                before = inductor_counts()
                fast = run(compile=compiled)
                cache = cache_use_since(before)
                same = fast == run()
                report[label] = {"tokens_equal": bool(same.all()), "fraction_equal": same.float().mean().item(),
                                 "compile_cache": cache}
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                report[label] = {"error": f"{type(error).__name__}: {error}"[:500]}
    return report


def model_size(name: str) -> int:
    """Rough compile cost of a model: its width squared times its depth."""
    config = PRESETS.get(name) or LLAMAGEN_PRESETS[name]
    return config["dim"] ** 2 * config["n_layer"]


def compile_tasks(args) -> list[tuple[str, int, str]]:
    """(model, batch, sampler) of every decode step the run compiles, fast-path checks (`check:<case>`) included;
    largest models first, so that the longest compiles do not start last."""
    samplers = inductor_samplers(args)
    tasks = [(name, batch, label) for name in args.models for batch in args.batch_sizes for label in samplers]
    if "plain" in samplers:  # our steps compile with inductor, so the checks' fast paths do too
        tasks += [(name, min(args.batch_sizes), f"check:{case}") for name in args.models
                  if name in args.check_models for case in CHECK_CASES]
    return sorted(tasks, key=lambda task: -model_size(task[0]))


def without_flag(argv: list[str], flag: str, values: int) -> list[str]:
    """`argv` without `flag` and the `values` arguments after it (also in its `--flag=value` form)."""
    kept, skip = [], 0
    for item in argv:
        if skip:
            skip -= 1
        elif item == flag:
            skip = values
        elif not item.startswith(flag + "="):
            kept.append(item)
    return kept


def precompile(args, argv: list[str]) -> tuple[dict, dict]:
    """Compile every decode step of the run in `--precompile-jobs` parallel processes of this script.

    Each worker builds the same model and calls one sampler once, which compiles its step and writes it to
    inductor's on-disk FX graph cache; the timing process then finds it there.
    Returns the workers' reports by (model, batch, sampler) and a summary for the JSON's meta."""
    tasks = compile_tasks(args)
    jobs = min(args.precompile_jobs, len(tasks)) or 1
    env = dict(os.environ)  # workers share the cores: inductor's own compile threads are divided among them
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    base = without_flag(argv, "--precompile-jobs", 1)
    script = str(Path(__file__).resolve())
    reports: dict = {}
    started = time.monotonic()
    print(f"precompiling {len(tasks)} decode steps in {jobs} processes")
    with tempfile.TemporaryDirectory(prefix="speed_precompile_") as tmp:

        def run(task: tuple[str, int, str]) -> dict:
            name, batch, label = task
            report = Path(tmp) / f"{name}_{batch}_{label.replace(':', '_')}.json"
            command = [sys.executable, script, *base, "--precompile-task", name, str(batch), label, str(report)]
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True,
                                      timeout=args.precompile_timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"stopped after --precompile-timeout {args.precompile_timeout:g} s"}
            if done.returncode or not report.exists():
                return {"error": f"exit code {done.returncode}: {done.stderr.strip()[-500:]}"}
            return json.loads(report.read_text())

        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(run, task): task for task in tasks}
            for count, future in enumerate(as_completed(futures), 1):
                task = futures[future]
                reports[task] = report = future.result()
                name, batch, label = task
                what = (f"failed: {report['error'].splitlines()[-1][:200]}" if "error" in report
                        else f"{report['seconds']:.0f} s, {report.get('kernels_per_step')} kernels per step")
                print(f"  [{count}/{len(tasks)}] {name} batch {batch} {label}: {what}", flush=True)
    summary = {"jobs": jobs, "tasks": len(tasks), "wall_s": time.monotonic() - started,
               "failed": [f"{name} batch {batch} {label}" for (name, batch, label), r in reports.items()
                          if "error" in r]}
    print(f"precompiled in {summary['wall_s']:.0f} s" + (f"; failed: {summary['failed']}" if summary["failed"] else ""))
    return reports, summary


def precompile_worker(args) -> int:
    """One `--precompile-jobs` worker: the first call of one sampler (compiling its decode step), reported as
    JSON with its time and kernel launches per step."""
    name, batch, label, report = args.precompile_task
    batch = int(batch)
    # Workers share the GPU, so the timings by which Triton picks a kernel's launch configuration on first use
    # would be skewed: they are not cached (the flag goes into the cached code), and the timing process, alone
    # on the GPU, tunes each kernel itself on its warm-up call, as it does without precompiling
    torch._inductor.config.autotune_local_cache = False
    if label.startswith("check:"):
        run = check_runs(args, name, batch)[label.removeprefix("check:")]
        fn = lambda: run(compile=compile_options(args))  # noqa: E731
    else:
        model = make_model(name, args.device, DTYPES[args.dtype])
        cond = torch.arange(batch, device=args.device) % model.num_classes
        fn = sampler_runs(args, model, make_wrapper(model, args.window), cond)[label]
    start = time.perf_counter()
    with torch.inference_mode():
        kernels = decode_step_kernels(fn)
    sync(args.device)
    Path(report).write_text(json.dumps({"seconds": time.perf_counter() - start, "kernels_per_step": kernels}))
    return 0


def evaluate_targets(rows: list[dict], window: int) -> list[dict]:
    """Each target of issue 8 that the rows can speak to, with the measured value and PASS/FAIL."""
    key, verdicts = f"tensorar_k{window}", []
    for row in rows:
        ours, plain = row.get(key), row.get("plain")
        where = f"{row['model']} batch {row['batch']}"
        for label, how in REFERENCE_COMPILES.items():  # against each compiled LlamaGen the run timed
            reference = row.get(label)
            if ours and reference and row["model"] in ("GPT-B", "GPT-L"):
                value = reference / ours
                verdicts.append({"target": f"TensorAR >= 3x faster than LlamaGen compiled, {how} ({where})",
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


def import_reference(path: str):
    """LlamaGen's `gpt` and `generate` modules from a checkout at `path` (its `autoregressive` and `utils`
    folders); a clear exit, before anything is compiled, when they cannot be imported."""
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        from autoregressive.models import generate as ref_generate
        from autoregressive.models import gpt as ref_gpt
    except ImportError as error:
        raise SystemExit(f"--reference {path}: cannot import LlamaGen's autoregressive.models from it ({error}); "
                         f"it needs the checkout's autoregressive/ and utils/ folders") from error
    return ref_gpt, ref_generate


def reference_runs(args, model: LlamaGen, cond: torch.Tensor) -> dict:
    """LlamaGen's own generate() on the same weights (eager, and compiled when asked)."""
    ref_gpt, ref_generate = import_reference(args.reference)
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
        # and as LlamaGen's sample_c2i.py ships it (the baseline issue 8 quotes): the model's forward compiled,
        # reduce-overhead and fullgraph, generate() unchanged, new KV caches on every call
        shipped = _CompiledForward(ref, torch.compile(_own_code(type(ref).forward), mode="reduce-overhead",
                                                      fullgraph=True))

        def run_sample_c2i():
            with _caches_as_shipped(ref):
                return ref_generate.generate(shipped, cond, steps, cfg_scale=args.cfg_scale)

        runs["llamagen_sample_c2i"] = run_sample_c2i
    return runs


class _CompiledForward:
    """`module` with its forward replaced by `forward` (compiled), as `torch.compile(module)` gives, but with
    a code object of its own per batch size (see `_own_code`); every other attribute is the module's."""

    def __init__(self, module: torch.nn.Module, forward):
        self._module, self._forward = module, forward

    def __call__(self, *args, **kwargs):
        return self._forward(self._module, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


@contextlib.contextmanager
def _caches_as_shipped(ref):
    """LlamaGen's own `setup_caches` (new caches on every call) for the block, whatever `--llamagen-caches` set."""
    patched = ref.__dict__.pop("setup_caches", None)
    try:
        yield
    finally:
        if patched is not None:
            ref.setup_caches = patched


if __name__ == "__main__":
    raise SystemExit(main())
