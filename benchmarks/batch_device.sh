#!/usr/bin/env bash
# One device call: bevfusion-batch with one GPU worker on the full-size model (nuscenes-r50), its
# frames/s beside bevfusion-bench's offline figure (the library path on one frame) from the same
# call. Run on the GPU machine from the repository root with the example data in .device/data,
# Ray and the bags' wheels in .ray (made here by `bash benchmarks/pack_ray.sh`) and the Python 3.12
# ROS wheels in .whl. The machine has no network and one call carries at most 64 MiB, less than
# .whl and .ray together: carry [".device", ".whl"] to a first call that sets ROS 2 up (e.g.
# benchmarks/node_device.sh), then [".device", ".ray"] to this one while that machine is warm
# (what the first call installed and exported stays there):
#   bash benchmarks/batch_device.sh
# Steps: ROS 2 from the carried wheels (benchmarks/device_ros_setup.sh; only checked when already
# set up) and Ray unpacked into $WORK/raysite, while the r50 model is exported (CPU work, skipped
# when MODEL_DIR has it) and BAGS bags of FRAMES generated scenes each are written
# (bevfusion-make-bag --seeds, in parallel); `bevfusion-bench --backend gpu` (offline: median
# end-to-end ms -> frames/s); then `bevfusion-batch --backend gpu --workers WORKERS
# --gpus-per-worker 1` over the bags (embedded Ray).
# Everything goes to WORK (/tmp/batch_device); $OUT gets library.json, batch.json and logs.tar.gz.
set -uo pipefail
OUT="${OUT:-out/batch_device}"
WORK="${WORK:-/tmp/batch_device}"
BAGS="${BAGS:-4}"
FRAMES="${FRAMES:-25}"
WORKERS="${WORKERS:-1}"
mkdir -p "$OUT" "$WORK/bags"
# shellcheck source=device_prelude.sh
source benchmarks/device_prelude.sh
if [ ! -d "$WORK/raysite/ray" ]; then     # Ray and the bags' wheels, packed by benchmarks/pack_ray.sh
  mkdir -p "$WORK/raysite" && tar -C "$WORK/raysite" -xJf .ray/ray-slim.tar.xz &&
    python3 -m pip install --quiet --no-index --no-deps --target "$WORK/raysite" .ray/wheels/*.whl \
      > "$WORK/ray_install.log" 2>&1 || { tail -20 "$WORK/ray_install.log"; rm -rf "$WORK/raysite"; exit 1; }
fi
export PYTHONPATH="$PWD:$WORK/raysite"
python3 -c "import ray; print('ray', ray.__version__)" || exit 1
bag_pids=()
for index in $(seq 0 $((BAGS - 1))); do
  start=$((300000 + index * FRAMES))
  python3 -m bevfusion_ros.tools.make_bag --seeds "$start:$((start + FRAMES))" --out "$WORK/bags/drive$index.mcap" \
    > "$WORK/make_bag$index.log" 2>&1 &
  bag_pids+=($!)
done
wait "${bag_pids[@]}"
[ -n "${export_pid:-}" ] && { wait "$export_pid"; echo "r50 export: $(tail -1 "$WORK/export.log")"; }
ls -la "$WORK/bags"
python3 -m bevfusion_ros.tools.bench --model "$model" --data "$data" --backend gpu --iters 300 --warmup 30 \
  --json "$WORK/library.json" > "$WORK/library.log" 2>&1
echo "library path (bevfusion-bench, 300 iterations):"; grep -A3 "^end-to-end" "$WORK/library.log"
python3 -m bevfusion_ros.tools.batch --model "$model" --bags "$WORK/bags" --out "$WORK/batch" --rerun \
  --backend gpu --workers "$WORKERS" --gpus-per-worker 1 --cpus-per-worker 4 --no-markers \
  --time-lag-field time_lag --num-sweeps 1 > "$WORK/batch.log" 2>&1
echo "bevfusion-batch: exit $?"; tail -12 "$WORK/batch.log"
python3 - "$WORK/library.json" "$WORK/batch/batch.json" <<'PY'
import json, sys
library, batch = (json.load(open(path)) for path in sys.argv[1:])
median_ms = library["pipeline"]["end_to_end"]["median"]
print(f"offline (bevfusion-bench, {library['backend']}): median {median_ms:.2f} ms -> {1000 / median_ms:.1f} frames/s")
print(f"batch, {batch['workers']} GPU worker(s): {batch['frames_run']} frames, {batch['frames_per_s']:.2f} frames/s "
      f"over the command, {batch['frames_per_s_running']:.2f} frames/s once the workers were ready")
PY
cp "$WORK/library.json" "$WORK/batch/batch.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.mcap' --exclude='*.onnx' --exclude=raysite . 2>/dev/null
exit 0
