#!/usr/bin/env bash
# speed.py on a GPU machine that runs commands under a time limit (see docs/benchmarks.md).
#
#   bash benchmarks/speed_on_device.sh all OUT_DIR [LLAMAGEN_DIR]     # issue 8 in one call: tiny, GPT-B, GPT-L
#   bash benchmarks/speed_on_device.sh autotune OUT_DIR               # ours under max-autotune, GPT-B/L batch 1
#   bash benchmarks/speed_on_device.sh smoke OUT_DIR [LLAMAGEN_DIR]   # tiny model + the fp64 fast-path check
#   bash benchmarks/speed_on_device.sh GPT-XL OUT_DIR [LLAMAGEN_DIR]  # one model per call: GPT-B, GPT-L, GPT-XL
#   bash benchmarks/speed_on_device.sh memory OUT_DIR                 # training memory (benchmarks/memory.py)
#
# Works from a source checkout without installing the package (PYTHONPATH=src). The JSON and the log go to
# OUT_DIR; merge per-model files with benchmarks/plot_speed.py A.json B.json --merged-json OUT.json. Every
# decode step is compiled first in parallel processes (--precompile-jobs, one per core): compilation, not
# timing, is most of a run. The speed modes fail unless every sampler ran without errors or skipped CUDA
# graphs and the fast path picked the eager tokens. SPEED_DEVICE=cpu dry-runs any mode on the micro model.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:?usage: speed_on_device.sh all|autotune|smoke|GPT-B|GPT-L|GPT-XL|memory OUT_DIR [LLAMAGEN_DIR]}"
out="${2:?usage: speed_on_device.sh MODE OUT_DIR [LLAMAGEN_DIR]}"
reference="${3:-.llamagen_ref}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

device="${SPEED_DEVICE:-cuda}"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if '$device' != 'cpu' else 'cpu')"
if [ "$mode" = memory ]; then  # GPT-B and GPT-L at LlamaGen's per-GPU batch (256 over 8 GPUs); micro for a dry run
    if [ "$device" = cpu ]; then models=(micro); batch=2; else models=(GPT-B GPT-L); batch=32; fi
    for source in noise model; do
        python3 benchmarks/memory.py --device "$device" --models "${models[@]}" --batch-size "$batch" --steps 3 \
            --draft-source "$source" --json "$out/memory_$source.json" 2>&1 | tee "$out/memory_$source.log"
    done
    exit 0
fi

jobs="$(python3 -c 'import os; print(min(16, os.cpu_count() or 1))')"
common=(--device "$device" --dtype bf16 --compile-ours --compile --precompile-jobs "$jobs" --eager-repeats 1
        --precompile-timeout 300)
if [ "$mode" = autotune ]; then  # a variant of our fast path alone: LlamaGen's step is the same in every run
    common+=(--compile-mode max-autotune)
elif [ -d "$reference/autoregressive" ]; then
    common+=(--reference "$reference")
else
    echo "no LlamaGen checkout at $reference: LlamaGen's generate() is not timed" >&2
fi
case "$mode" in
    all)    models=(tiny GPT-B GPT-L); checks=(tiny GPT-B); batches=(1 32) ;;  # every target of issue 8
    autotune) models=(GPT-B GPT-L); checks=(); batches=(1) ;;  # Triton matmuls with fused epilogues: fewer launches?
    smoke)  models=(tiny); checks=(tiny); batches=(1) ;;
    *)      models=("$mode"); checks=(); batches=(1 32) ;;
esac
if [ "$device" = cpu ]; then  # a dry run: the same calls on models a CPU samples in seconds
    common=("${common[@]/bf16/fp32}"); [ "$mode" = autotune ] || common+=(--compile-mode '')
    models=(micro); checks=(micro); batches=(1 2)
fi
json="$out/speed_$mode.json"
python3 benchmarks/speed.py "${common[@]}" --models "${models[@]}" --batch-sizes "${batches[@]}" \
    --check-models "${checks[@]}" --json "$json" 2>&1 | tee "$out/$mode.log"

python3 - "$json" "$device" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
on_gpu = sys.argv[2] != "cpu"  # CPUs have no CUDA graphs to skip
problems = {}
for row in data["rows"]:
    where = f"{row['model']} batch {row['batch']}"
    if row["errors"]:
        problems[f"{where} errors"] = row["errors"]
    skipped = {k: v for k, v in row["cudagraph_skips"].items() if v and on_gpu}
    ours = {k: v for k, v in skipped.items() if not k.startswith("llamagen_")}  # LlamaGen's: how it ships, not ours
    if ours:
        problems[f"{where} cudagraph_skips"] = ours
    if len(ours) < len(skipped):
        print(f"{where}: LlamaGen graphs run without CUDA graphs:", {k: v for k, v in skipped.items() if k not in ours})
for model, cases in data["checks"].items():
    wrong = {k: v for k, v in cases.items() if not v.get("tokens_equal")}
    if wrong:
        problems[f"{model} fast path != eager"] = wrong
misses = {f"{r['model']} batch {r['batch']}": c for r in data["rows"] for c in [r.get("compile_cache", {})]
          if any(v["misses"] for v in c.values())}
misses.update({f"{model} check {case}": v["compile_cache"] for model, cases in data["checks"].items()
               for case, v in cases.items() if v.get("compile_cache", {}).get("misses")})
print("compile cache misses after precompiling (time lost, not a failure):", misses or "none")
for target in data["targets"]:
    print(f"  {'PASS' if target['pass'] else 'FAIL'}  {target['target']}: {target['value']:.2f}")
print("checks:", "OK" if not problems else problems)
sys.exit(1 if problems else 0)
PY
