"""The speed benchmark runs end to end on a micro model and its fast-path token check holds; its plot reads it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: tests that compile with inductor on the CPU, which builds C++ kernels
needs_c_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                      reason="inductor on CPU needs a C compiler")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_table_json_check_and_plot(tmp_path, capsys):
    speed, plot = load_script("speed"), load_script("plot_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--models", "micro", "--batch-sizes", "1", "2", "--repeats", "1", "--compile-ours",
                       "--compile-backend", "aot_eager", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["batch"]) for r in data["rows"]] == [("micro", 1), ("micro", 2)]
    assert all(r["plain"] > 0 and r["tensorar_k4"] > 0 and not r["errors"] for r in data["rows"])
    assert all(r["kernels_per_step"] == {} for r in data["rows"])  # aot_eager generates no kernels to count
    checks = data["checks"]["micro"]
    assert set(checks) == {"plain_greedy", "tensorar_greedy", "tensorar_sampled"}
    assert all(check["tokens_equal"] for check in checks.values())
    assert [t["target"].startswith("TensorAR <= 1.10x") for t in data["targets"]] == [True, True]
    assert "micro" in capsys.readouterr().out

    # --append replaces the rows of the models it measures and keeps the others
    data["rows"].append({**data["rows"][0], "model": "other"})
    out.write_text(json.dumps(data))
    speed.main(["--models", "micro", "--batch-sizes", "1", "--repeats", "1", "--check-models", "--json", str(out),
                "--append"])
    assert [(r["model"], r["batch"]) for r in json.loads(out.read_text())["rows"]] == [("other", 1), ("micro", 1)]

    pytest.importorskip("matplotlib")
    assert plot.main([str(out), "--out", str(tmp_path / "speed.png")]) == 0
    table = capsys.readouterr().out
    assert "| micro | 1 |" in table and "| other | 1 |" in table
    assert (tmp_path / "speed.png").stat().st_size > 0

    # one file per model (a device's per-command limit) merged locally; --append never starts a new file
    with pytest.raises(SystemExit, match="--append: .*missing.json does not exist"):
        speed.main(["--models", "micro", "--json", str(tmp_path / "missing.json"), "--append"])
    second = json.loads(out.read_text())
    second["rows"] = [{**row, "model": "big"} for row in second["rows"]]
    second["meta"]["command"] = "second"
    (tmp_path / "second.json").write_text(json.dumps(second))
    merged_path = tmp_path / "merged.json"
    assert plot.main([str(out), str(tmp_path / "second.json"), "--out", str(tmp_path / "m.png"),
                      "--merged-json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert [(r["model"], r["batch"]) for r in merged["rows"]] == [("other", 1), ("micro", 1), ("big", 1), ("big", 1)]
    assert merged["meta"]["commands"][-1] == "second" and len(merged["targets"]) == 4
    second["meta"]["dtype"] = "bf16"
    (tmp_path / "second.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit, match="differ in dtype"):
        plot.main([str(out), str(tmp_path / "second.json"), "--out", str(tmp_path / "m.png")])


def test_speed_benchmark_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit):
        load_script("speed").main(["--models", "GPT-B", "GPT-Q"])
    assert "--models: unknown model(s) ['GPT-Q']" in capsys.readouterr().err


def test_kernel_count_reads_launches_not_definitions_or_the_harness():
    code = """
from torch._inductor.select_algorithm import extern_kernels
aten = torch.ops.aten
cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], '''extern "C" void kernel(float* x) {}''')
triton_poi_fused_mul_1 = async_compile.triton('triton_poi_fused_mul_1', '''
@triton.jit
def triton_poi_fused_mul_1(in_ptr0, xnumel):
    tmp0 = tl.load(in_ptr0 + x0)
''')
def partition_0(args):
    triton_poi_fused_mul_1.run(buf1, 8, stream=stream0)
    extern_kernels.addmm(b, buf1, w, out=buf3)
class Runner:
    def call(self, args):
        cpp_fused_add_0(buf0)
        extern_kernels.mm(buf0, arg1, out=buf1)
        (buf3, ) = self.partitions[0](partition0_args)
        buf2 = torch.ops.aten._scaled_dot_product_flash_attention.default(buf1, buf1, buf1)
        return (buf2, )
def get_args():
    return [rand_strided((8, ), (1, ), device='cpu')]
def benchmark_compiled_module(args, times=10, repeat=10):
    cpp_fused_add_0(x)
"""
    # the inline launches of `call` and those of the partition function (how CUDA-graph partitions are emitted)
    assert load_script("speed").count_kernel_calls(code) == 5


@needs_c_compiler
def test_kernel_count_of_compiled_decode_steps():
    """Inductor's step for a window-1 wrapper is the plain sampler's; window 4 adds the encoder and decoder."""
    import torch

    from tensorar_plugin import sample_plain

    speed = load_script("speed")
    model, cond = speed.make_model("micro", "cpu", torch.float32), torch.arange(2)
    with torch.inference_mode():
        plain = speed.decode_step_kernels(lambda: sample_plain(model, cond, cfg_scale=2.0, compile=True))
        k1, k4 = (speed.decode_step_kernels(lambda k=k: speed.make_wrapper(model, k).generate(
            cond, cfg_scale=2.0, compile=True)) for k in (1, 4))
        # the plain step is compiled and kept on the model: a second call compiles nothing
        again = speed.decode_step_kernels(lambda: sample_plain(model, cond, cfg_scale=2.0, compile=True))
    assert plain and k1 == plain and k4 > plain
    assert again is None


@needs_c_compiler
def test_precompile_workers_fill_the_cache_the_timing_process_loads(tmp_path, monkeypatch):
    """--precompile-jobs: parallel workers compile every step; the timing process compiles none of them itself
    (each step is a hit in inductor's FX graph cache), and it reports the kernel counts the workers saw."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: only the workers fill it
    speed, out = load_script("speed"), tmp_path / "speed.json"
    assert speed.main(["--models", "micro", "--batch-sizes", "1", "--repeats", "1", "--compile-ours",
                       "--compile-mode", "", "--check-models", "--precompile-jobs", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {k: data["meta"]["precompile"][k] for k in ("jobs", "tasks", "failed")} == {"jobs": 2, "tasks": 2,
                                                                                       "failed": []}
    (row,) = data["rows"]
    assert row["compile_cache"] == {"plain": {"hits": 1, "misses": 0}, "tensorar_k4": {"hits": 1, "misses": 0}}
    kernels = row["kernels_per_step"]
    assert kernels["plain"] > 0 and kernels["tensorar_k4"] > kernels["plain"]  # counted by the workers
    assert not row["errors"] and row["plain"] > 0 and row["tensorar_k4"] > 0


def test_precompile_tasks_cover_every_compiled_step_largest_model_first():
    speed = load_script("speed")
    args = speed.parse_args(["--models", "micro", "GPT-B", "--batch-sizes", "1", "32", "--compile-ours",
                             "--check-models", "micro", "--reference", "/ref", "--compile"])
    tasks = speed.compile_tasks(args)
    samplers = ["plain", "tensorar_k4", "llamagen_compiled", "llamagen_sample_c2i"]
    assert tasks[:8] == [("GPT-B", b, s) for b in (1, 32) for s in samplers]
    assert tasks[8:] == [("micro", b, s) for b in (1, 32) for s in samplers] + [
        ("micro", 1, f"check:{case}") for case in speed.CHECK_CASES]
    # without --compile-ours only LlamaGen's step is compiled, and the fast-path checks have nothing to check
    args = speed.parse_args(["--models", "micro", "--batch-sizes", "1", "--reference", "/ref", "--compile"])
    assert speed.compile_tasks(args) == [("micro", 1, "llamagen_compiled"), ("micro", 1, "llamagen_sample_c2i")]
    # a worker gets the run's own arguments without the flag that would make it start workers of its own
    argv = ["--models", "micro", "--precompile-jobs", "4", "--repeats", "2", "--precompile-jobs=3"]
    assert speed.without_flag(argv, "--precompile-jobs", 1) == ["--models", "micro", "--repeats", "2"]


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--eager-repeats", "0"), ("--precompile-jobs", "-1")])
def test_speed_benchmark_rejects_counts_out_of_range(flag, value, capsys):
    with pytest.raises(SystemExit):
        load_script("speed").parse_args([flag, value])
    assert f"{flag} must be >= " in capsys.readouterr().err


def test_speed_benchmark_time_budget_skips_later_models(tmp_path):
    speed, out = load_script("speed"), tmp_path / "speed.json"
    assert speed.main(["--models", "micro", "micro", "--batch-sizes", "1", "--repeats", "1", "--check-models",
                       "--time-budget", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["meta"]["skipped_models"] == ["micro", "micro"]


# A stand-in for a LlamaGen checkout with the two modules the benchmark imports: our LlamaGen under its names
# (same constructor arguments, state dict, setup_caches and forward modes) and a greedy generate() that, like
# LlamaGen's, looks its per-token step up by module-global name and sets up new caches on every call.
STUB_GPT = "from tensorar_plugin.models.llamagen import LlamaGen as Transformer, LlamaGenConfig as ModelArgs\n"
STUB_GENERATE = """
import torch

def decode_one_token(model, x, input_pos, cfg_scale, cfg_flag):
    logits, _ = model(torch.cat([x, x]) if cfg_scale > 1.0 else x, cond_idx=None, input_pos=input_pos)
    if cfg_scale > 1.0:
        cond, uncond = logits.chunk(2)
        logits = uncond + (cond - uncond) * cfg_scale if cfg_flag else cond
    return logits[:, -1].argmax(dim=-1, keepdim=True), None

@torch.no_grad()
def generate(model, cond, max_new_tokens, cfg_scale=1.0):
    rows = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if cfg_scale > 1.0 else cond
    model.setup_caches(max_batch_size=rows.shape[0], max_seq_length=1 + max_new_tokens,
                       dtype=model.tok_embeddings.weight.dtype)
    logits, _ = model(None, rows, torch.arange(1, device=cond.device))
    if cfg_scale > 1.0:
        c, u = logits.chunk(2)
        logits = u + (c - u) * cfg_scale
    token, out = logits[:, -1].argmax(dim=-1, keepdim=True), []
    for i in range(max_new_tokens):
        out.append(token)
        if i + 1 < max_new_tokens:
            token, _ = decode_one_token(model, token, torch.tensor([1 + i], device=cond.device), cfg_scale, True)
    return torch.cat(out, dim=1)
"""


@pytest.fixture
def stub_llamagen(tmp_path):
    import sys

    root = tmp_path / "llamagen"
    (root / "autoregressive" / "models").mkdir(parents=True)
    (root / "autoregressive" / "__init__.py").write_text("")
    (root / "autoregressive" / "models" / "__init__.py").write_text("")
    (root / "autoregressive" / "models" / "gpt.py").write_text(STUB_GPT)
    (root / "autoregressive" / "models" / "generate.py").write_text(STUB_GENERATE)
    yield root
    for name in [name for name in sys.modules if name.split(".")[0] == "autoregressive"]:
        del sys.modules[name]
    if str(root) in sys.path:
        sys.path.remove(str(root))


@needs_c_compiler
def test_speed_benchmark_times_llamagen_three_ways_from_a_checkout(stub_llamagen, tmp_path):
    """--reference: LlamaGen's generate() eager, with its decode step compiled and caches reused, and compiled
    as its sample_c2i.py does (the model's forward, new caches per call), on the same weights as ours."""
    speed, out = load_script("speed"), tmp_path / "speed.json"
    assert speed.main(["--models", "micro", "--batch-sizes", "2", "--repeats", "1", "--reference", str(stub_llamagen),
                       "--compile", "--check-models", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert not row["errors"]
    assert all(row[key] > 0 for key in ("plain", "tensorar_k4", "llamagen_eager", "llamagen_compiled",
                                        "llamagen_sample_c2i"))
    assert set(row["kernels_per_step"]) == {"llamagen_compiled", "llamagen_sample_c2i"}  # ours ran eager


def test_llamagen_as_shipped_block_restores_the_cache_reuse_patch():
    speed = load_script("speed")

    class Ref:
        def setup_caches(self, *args):
            return "LlamaGen's own"

    ref = Ref()
    ref.setup_caches = speed._reusing_setup_caches(ref)
    patched = ref.setup_caches
    with speed._caches_as_shipped(ref):
        assert ref.setup_caches() == "LlamaGen's own"
    assert ref.setup_caches is patched
    plain = Ref()
    with speed._caches_as_shipped(plain):  # nothing patched: nothing to put back
        pass
    assert "setup_caches" not in plain.__dict__


def test_reference_that_cannot_be_imported_stops_the_run_before_compiling(tmp_path):
    with pytest.raises(SystemExit, match="--reference .*cannot import LlamaGen's autoregressive.models"):
        load_script("speed").main(["--models", "micro", "--reference", str(tmp_path), "--json",
                                   str(tmp_path / "speed.json")])


def test_quality_steps_plot_sorts_runs_into_series_and_refuses_duplicates(tmp_path, capsys):
    steps_plot = load_script("plot_quality_steps")
    settings = {"steps": 200, "noise_schedule": None, "draft_source": None, "slot_weights": None}
    runs = [{"arm": "plain", "seed": 0, "fid": 10.0, "class_acc": 0.5},
            {"arm": "plain", "seed": 1, "fid": 14.0, "class_acc": 0.7},
            {"arm": "tensorar", "seed": 0, "fid": 20.0, "class_acc": 0.4},
            {"arm": "tensorar_argmax", "seed": 0, "fid": 30.0, "class_acc": 0.3}]
    (tmp_path / "a.json").write_text(json.dumps({"settings": settings, "runs": runs}))
    tuned = {**settings, "steps": 600, "draft_source": "model", "slot_weights": [1.0, 0.1, 0.1, 0.1]}
    frozen = {**tuned, "freeze_backbone": True}
    (tmp_path / "b.json").write_text(json.dumps({"settings": tuned, "runs": runs[2:3]}))
    (tmp_path / "c.json").write_text(json.dumps({"settings": frozen, "runs": runs[2:3]}))  # not a drawn series
    (tmp_path / "d.partial.json").write_text(json.dumps(runs))  # a run cut short: a bare list, skipped
    files = sorted(tmp_path.glob("*.json"))
    assert steps_plot.main([str(f) for f in files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| plain next-token | 200 | 0, 1 | 12.0 ± 2.8 | 0.600 ± 0.141 |" in lines
    assert "| TensorAR, paper defaults | 200 | 0 | 20.0 ± 0.0 | 0.400 ± 0.000 |" in lines
    assert "| TensorAR, model drafts, slot weights 1/0.1/0.1/0.1 | 600 | 0 | 20.0 ± 0.0 | 0.400 ± 0.000 |" in lines
    assert len(lines) == 5  # header, rule, three rows: argmax sampling and the frozen backbone are left out

    (tmp_path / "e.json").write_text(json.dumps({"settings": settings, "runs": runs[:1]}))
    with pytest.raises(ValueError, match="plain next-token, 200 steps, seed 0 is also in another file"):
        steps_plot.collect(sorted(tmp_path.glob("*.json")))

    pytest.importorskip("matplotlib")
    steps_plot.plot(steps_plot.collect(files), tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_memory_benchmark_runs_both_settings_in_their_own_processes(tmp_path, capsys):
    memory = load_script("memory")
    out = tmp_path / "memory.json"
    assert memory.main(["--models", "micro", "--batch-size", "2", "--steps", "1", "--draft-source", "model",
                        "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["mode"]) for r in data["rows"]] == [("micro", "default"), ("micro", "recompute_logits")]
    default, lean = data["rows"]
    assert lean["loss"] == pytest.approx(default["loss"], rel=1e-5)  # the same step, computed two ways
    assert all(r["step_s"] > 0 and r["params"] == default["params"] for r in data["rows"])
    assert data["meta"]["command"].startswith("python benchmarks/memory.py --models micro")
    assert data["meta"]["draft_source"] == "model"
    assert "recompute_logits peaks" in capsys.readouterr().out
