#!/usr/bin/env bash
# One device call: bevfusion_node on the GPU, fed over ROS 2 at sensor rate, beside the library
# path's figure from the same machine. Run on the GPU machine from the repository root with the
# example data in .device/data and the Python 3.12 ROS wheels in .whl (the device tool's carry:
# [".device", ".whl"]):
#   bash benchmarks/node_device.sh
# Steps: ROS 2 from the carried wheels + the interface packages (benchmarks/device_ros_setup.sh)
# while the full-size model is exported (CPU work); `bevfusion-bench` (library path); then
# `bevfusion-bench --through-node` with raw Image input at RATES (each DURATION s, boxes compared
# with the library path) and with CompressedImage input at COMPRESSED_RATES. With a baseline
# checkout in .baseline (e.g. `git archive COMMIT bevfusion_ros config | tar -x -C .baseline`, carried
# too), the same node benchmarks first run its node (BEFORE_RATES, BEFORE_COMPRESSED_RATES):
# before and after from one call, one machine.
# Everything goes to WORK (/tmp/node_device); $OUT gets the JSON reports (library.json,
# [before_]raw.json, [before_]compressed.json) and logs.tar.gz (every log, the node's included).
# An empty *_RATES (e.g. BEFORE_COMPRESSED_RATES="") skips that run. JPEG_TESTS=0 skips the GPU JPEG tests (test/gpu/test_jpeg_gpu.py) at the start.
set -uo pipefail
OUT="${OUT:-out/node_device}"
WORK="${WORK:-/tmp/node_device}"
RATES="${RATES:-12 25 30}"
COMPRESSED_RATES="${COMPRESSED_RATES-12}"
BEFORE_RATES="${BEFORE_RATES-12 25}"
BEFORE_COMPRESSED_RATES="${BEFORE_COMPRESSED_RATES-12}"
DURATION="${DURATION:-60}"
BEFORE_DURATION="${BEFORE_DURATION:-$DURATION}"
# The exported weights are untrained: at the model's threshold they give no box. 0.05 keeps a
# realistic number, so that building and publishing the outputs is measured and boxes compared.
SCORE_THRESHOLD="${SCORE_THRESHOLD:-0.05}"
mkdir -p "$OUT" "$WORK"
# shellcheck source=device_prelude.sh
source benchmarks/device_prelude.sh
if [ "${JPEG_TESTS:-1}" = 1 ]; then
  BEVFUSION_EXAMPLE_DATA="$data" python3 -m pytest -q -p no:cacheprovider -s test/gpu/test_jpeg_gpu.py \
    > "$WORK/jpeg_gpu_tests.log" 2>&1; echo "GPU JPEG tests: $(tail -1 "$WORK/jpeg_gpu_tests.log")"
  grep -h -i "nvjpeg\|timing\|corrupt\|failed" "$WORK/jpeg_gpu_tests.log" | head -12
fi
[ -n "${export_pid:-}" ] && { wait "$export_pid"; echo "r50 export: $(tail -1 "$WORK/export.log")"; }
python3 -m bevfusion_ros.tools.bench --model "$model" --data "$data" --backend gpu --iters 300 --warmup 30 \
  --json "$WORK/library.json" > "$WORK/library.log" 2>&1
echo "library path (bevfusion-bench, 300 iterations):"; grep -A3 "^end-to-end" "$WORK/library.log"
node_bench() {   # name, then bevfusion-bench options
  local name="$1"; shift
  python3 -m bevfusion_ros.tools.bench --through-node --model "$model" --data "$data" --backend gpu \
    --duration "$DURATION" --score-threshold "$SCORE_THRESHOLD" --out "$WORK/$name" --json "$WORK/$name.json" "$@" > "$WORK/$name.log" 2>&1
  echo "--- node, $name: exit $?"; grep -v "^    stage\.\|engine backend" "$WORK/$name.log" | tail -40
  cp "$WORK/$name.json" "$OUT/" 2>/dev/null
}
# shellcheck disable=SC2086
if [ -d .baseline/bevfusion_ros ]; then
  [ -n "$BEFORE_RATES" ] && \
    node_bench before_raw --rates $BEFORE_RATES --node-source "$PWD/.baseline" --duration "$BEFORE_DURATION"
  [ -n "$BEFORE_COMPRESSED_RATES" ] && \
    node_bench before_compressed --rates $BEFORE_COMPRESSED_RATES --compressed --node-source "$PWD/.baseline" \
      --duration "$BEFORE_DURATION"
fi
node_bench raw --rates $RATES --check-boxes
[ -n "$COMPRESSED_RATES" ] && node_bench compressed --rates $COMPRESSED_RATES --compressed
cp "$WORK/library.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.jsonl' --exclude='*.onnx' . 2>/dev/null
exit 0
