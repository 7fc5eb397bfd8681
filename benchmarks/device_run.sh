#!/usr/bin/env bash
# One device call: environment facts, GPU tests, then the benchmark of the full-size model.
# Run on the GPU machine from the repository root with the example data carried in .device/:
#   bash benchmarks/device_run.sh [pytest args...]
# Writes logs and JSON under $OUT (or ./out/device when OUT is unset).
set -uo pipefail
OUT="${OUT:-out/device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=4
export BEVFUSION_EXAMPLE_DATA="$PWD/.device/data/cuda-bevfusion-example"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, torch, onnxruntime; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(), 'ort', onnxruntime.__version__)"
python3 -m pytest -q -p no:cacheprovider test/gpu "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
if [ "${BENCH:-1}" = 1 ]; then
  model="${MODEL_DIR:-/tmp/r50-fp16}"
  [ -f "$model/export.yaml" ] || python3 -m bevfusion_ros.model.export --preset nuscenes-r50 --out "$model" | tail -2
  python3 -m bevfusion_ros.tools.bench --model "$model" --data "$BEVFUSION_EXAMPLE_DATA" \
    --backend gpu --iters "${ITERS:-200}" --warmup 20 --compare-cpu "${CPU_ITERS:-3}" \
    --compare-reference "${REF_ITERS:-10}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
fi
