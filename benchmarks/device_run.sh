#!/usr/bin/env bash
# One device call: environment facts, GPU tests, the lidar encoder's per-layer profile and the
# benchmark of the full-size model. Run on the GPU machine from the repository root with the
# example data carried in .device/ (the device tool's carry: [".device"]):
#   bash benchmarks/device_run.sh [pytest -k expression]
# Writes logs and JSON under $OUT (or ./out/device when OUT is unset). Steps are independent:
# a failing test does not stop the benchmark. STEPS (default "tests parity profile bench";
# "timeline" and "engines" add benchmarks/timeline.py and engine_profile.py) selects; ITERS, CPU_ITERS and REF_ITERS set the benchmark's repetitions.
set -uo pipefail
OUT="${OUT:-out/device}"
STEPS="${STEPS:-tests parity profile bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=8
export BEVFUSION_EXAMPLE_DATA="$PWD/.device/data/cuda-bevfusion-example"
export BEVFUSION_R50_FP16_DIR="${MODEL_DIR:-/tmp/r50-fp16}"
model="$BEVFUSION_R50_FP16_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import cupy, torch, onnxruntime; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(), 'ort', onnxruntime.__version__)"
# The r50 export is CPU work: it runs while the GPU tests that do not need it run.
if [ ! -f "$model/export.yaml" ]; then
  python3 -m bevfusion_ros.tools.export --preset nuscenes-r50 --out "$model" > "$OUT/export.log" 2>&1 &
  export_pid=$!
fi
filter="${1:-}"
if [[ " $STEPS " == *" tests "* ]]; then
  python3 -m pytest -q -p no:cacheprovider -rs test/gpu -k "not r50${filter:+ and ($filter)}" -s \
    > "$OUT/gpu_tests.log" 2>&1
  echo "GPU tests (tiny/random): $(tail -1 "$OUT/gpu_tests.log")"
fi
[ -n "${export_pid:-}" ] && { wait "$export_pid"; echo "r50 export: $(tail -1 "$OUT/export.log")"; }
if [[ " $STEPS " == *" tests "* ]]; then
  python3 -m pytest -q -p no:cacheprovider -rs test/gpu -k "r50${filter:+ and ($filter)}" -s \
    > "$OUT/gpu_tests_r50.log" 2>&1
  echo "GPU tests (r50): $(tail -1 "$OUT/gpu_tests_r50.log")"
  grep -h "FAILED\|Error\|GPU vs CPU\|median\| ms" "$OUT/gpu_tests.log" "$OUT/gpu_tests_r50.log" | head -60
fi
if [[ " $STEPS " == *" parity "* ]]; then
  MODEL_DIR="$model" bash benchmarks/debug_tiny_parity.sh > "$OUT/parity.log" 2>&1
  grep -v "rel L2 [0-9.]*e-0[5-9]" "$OUT/parity.log"
fi
if [[ " $STEPS " == *" profile "* ]]; then
  python3 benchmarks/lidar_profile.py "$model" "$BEVFUSION_EXAMPLE_DATA" --gpu --dtype float16 \
    > "$OUT/lidar_profile.log" 2>&1
  tail -28 "$OUT/lidar_profile.log"
fi
if [[ " $STEPS " == *" engines "* ]]; then
  python3 benchmarks/engine_profile.py "$model" > "$OUT/engine_profile.log" 2>&1
  grep -v Warning "$OUT/engine_profile.log" | tail -60
fi
if [[ " $STEPS " == *" timeline "* ]]; then
  python3 benchmarks/timeline.py "$model" "$BEVFUSION_EXAMPLE_DATA" --frames "${TIMELINE_FRAMES:-20}" \
    > "$OUT/timeline.log" 2>&1
  tail -40 "$OUT/timeline.log"
fi
if [[ " $STEPS " == *" bench "* ]]; then
  python3 -m bevfusion_ros.tools.bench --model "$model" --data "$BEVFUSION_EXAMPLE_DATA" \
    --backend gpu --iters "${ITERS:-300}" --warmup 30 --compare-cpu "${CPU_ITERS:-3}" \
    --compare-reference "${REF_ITERS:-20}" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  tail -30 "$OUT/bench.log"
fi
