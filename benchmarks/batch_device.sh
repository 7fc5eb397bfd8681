#!/usr/bin/env bash
# One device call: bevfusion-batch with GPU workers on the full-size model (nuscenes-r50), its
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
# end-to-end ms -> frames/s); then for each WORKERS:GPUS:PREFETCH of LAYOUTS (default
# "1:1:0 1:1:2 2:0.5:2 4:0.25:2": one worker per GPU reading in its thread or ahead, or several
# sharing the GPU) `bevfusion-batch --backend gpu --workers WORKERS --gpus-per-worker GPUS
# --prefetch PREFETCH` over the bags (embedded Ray), with the per-frame phases (read: the bag's
# messages to an assembled frame; forward; outputs) from the FrameInfo of its detections bags.
# Everything goes to WORK (/tmp/batch_device); $OUT gets library.json, batch.tar (batch-LAYOUT.json:
# batch.json plus the phases' medians) and logs.tar.gz.
set -uo pipefail
OUT="${OUT:-out/batch_device}"
WORK="${WORK:-/tmp/batch_device}"
BAGS="${BAGS:-8}"
FRAMES="${FRAMES:-25}"
LAYOUTS="${LAYOUTS:-1:1:0 1:1:2 2:0.5:2 4:0.25:2}"   # WORKERS:GPUS_PER_WORKER:PREFETCH, one run each
CPUS_PER_WORKER="${CPUS_PER_WORKER:-2}"
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
for layout in $LAYOUTS; do      # WORKERS:GPUS_PER_WORKER:PREFETCH
  IFS=: read -r workers gpus frames_ahead <<< "$layout"
  python3 -m bevfusion_ros.tools.batch --model "$model" --bags "$WORK/bags" --out "$WORK/batch-$layout" --rerun \
    --backend gpu --workers "$workers" --gpus-per-worker "$gpus" --cpus-per-worker "$CPUS_PER_WORKER" \
    --prefetch "$frames_ahead" --no-markers --time-lag-field time_lag --num-sweeps 1 > "$WORK/batch-$layout.log" 2>&1
  echo "--- bevfusion-batch, $workers worker(s) of $gpus GPU, prefetch $frames_ahead: exit $?"
  tail -3 "$WORK/batch-$layout.log"
done
python3 - "$WORK" $LAYOUTS <<'PY'
import json, statistics, sys
from pathlib import Path
from bevfusion_ros.ros.bag import read_bag
from bevfusion_ros.ros.node_runner import FRAME_INFO_TOPIC
work, layouts = Path(sys.argv[1]), sys.argv[2:]
library = json.loads((work / "library.json").read_text())
median_ms = library["pipeline"]["end_to_end"]["median"]
print(f"offline (bevfusion-bench, {library['backend']}): median {median_ms:.2f} ms -> {1000 / median_ms:.1f} frames/s")
for layout in layouts:
    batch = json.loads((work / f"batch-{layout}" / "batch.json").read_text())
    phases: dict[str, list[float]] = {}
    for done in sorted((work / f"batch-{layout}" / "bags").glob("*/detections.mcap")):
        for message in read_bag(done, [FRAME_INFO_TOPIC]):
            for name, ms in zip(message.message.timing_names, message.message.timing_ms):
                if not name.startswith("stage."):
                    phases.setdefault(name, []).append(ms)
    medians = ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in phases.items())
    print(f"batch {layout} (workers:GPUs each:prefetch): {batch['frames_run']} frames, {batch['frames_per_s']:.2f} frames/s "
          f"over the command, {batch['frames_per_s_running']:.2f} once the workers were ready; "
          f"per frame, median ms: {medians}")
    (work / f"batch-{layout}.json").write_text(json.dumps({**batch, "phase_median_ms": {
        name: statistics.median(values) for name, values in phases.items()}}, indent=1))
PY
cp "$WORK/library.json" "$OUT/"
tar -cf "$OUT/batch.tar" -C "$WORK" $(cd "$WORK" && ls batch-*.json)
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.mcap' --exclude='*.onnx' --exclude=raysite . 2>/dev/null
exit 0
