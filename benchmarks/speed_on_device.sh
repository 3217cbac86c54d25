#!/usr/bin/env bash
# One speed.py call per model on a GPU machine that runs commands under a time limit (see docs/benchmarks.md).
#
#   bash benchmarks/speed_on_device.sh smoke OUT_DIR [LLAMAGEN_DIR]   # tiny model + the fp64 fast-path check
#   bash benchmarks/speed_on_device.sh GPT-B OUT_DIR [LLAMAGEN_DIR]   # then GPT-L, GPT-XL: one JSON each
#   bash benchmarks/speed_on_device.sh memory OUT_DIR                  # training memory (benchmarks/memory.py)
#
# Works from a source checkout without installing the package (PYTHONPATH=src). The JSON and the log go to
# OUT_DIR; merge the per-model files with benchmarks/plot_speed.py A.json B.json --merged-json OUT.json.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${1:?usage: speed_on_device.sh smoke|GPT-B|GPT-L|GPT-XL|memory OUT_DIR [LLAMAGEN_DIR]}"
out="${2:?usage: speed_on_device.sh MODEL OUT_DIR [LLAMAGEN_DIR]}"
reference="${3:-.llamagen_ref}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

device="${SPEED_DEVICE:-cuda}"  # SPEED_DEVICE=cpu: a dry run of this script on a machine without a GPU
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if '$device' != 'cpu' else 'cpu')"
if [ "$model" = memory ]; then  # GPT-B and GPT-L at LlamaGen's per-GPU batch (256 over 8 GPUs); micro for a dry run
    if [ "$device" = cpu ]; then models=(micro); batch=2; else models=(GPT-B GPT-L); batch=32; fi
    for source in noise model; do
        python3 benchmarks/memory.py --device "$device" --models "${models[@]}" --batch-size "$batch" --steps 3 \
            --draft-source "$source" --json "$out/memory_$source.json" 2>&1 | tee "$out/memory_$source.log"
    done
    exit 0
fi
common=(--device "$device" --dtype bf16 --compile-ours --compile)
if [ -d "$reference/autoregressive" ]; then
    common+=(--reference "$reference")
else
    echo "no LlamaGen checkout at $reference: LlamaGen's generate() is not timed" >&2
fi

if [ "$model" = smoke ]; then
    # fast path == eager in fp64, and every sampler runs without errors or skipped CUDA graphs
    python3 benchmarks/speed.py "${common[@]}" --models tiny --batch-sizes 1 --check-models tiny \
        --json "$out/speed_smoke.json" 2>&1 | tee "$out/smoke.log"
    python3 - "$out/speed_smoke.json" "$device" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
row = data["rows"][0]
on_gpu = sys.argv[2] != "cpu"  # CPUs have no CUDA graphs to skip
problems = {"errors": row["errors"],
            "cudagraph_skips": {k: v for k, v in row["cudagraph_skips"].items() if v and on_gpu},
            "checks": {k: v for k, v in data["checks"]["tiny"].items() if not v.get("tokens_equal")}}
print("smoke:", "OK" if not any(problems.values()) else problems)
sys.exit(1 if any(problems.values()) else 0)
EOF
else
    python3 benchmarks/speed.py "${common[@]}" --models "$model" --batch-sizes 1 32 --check-models \
        --json "$out/speed_$model.json" 2>&1 | tee "$out/$model.log"
fi
