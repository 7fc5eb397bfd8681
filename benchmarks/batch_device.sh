#!/usr/bin/env bash
# One device call: bevfusion-batch with one GPU worker on the full-size model (nuscenes-r50), its
# frames/s beside bevfusion-bench's offline figure (the library path on one frame) from the same
# machine. Run on the GPU machine from the repository root with the example data in .device/data,
# and in .whl the Python 3.12 ROS wheels plus Ray and its dependencies (the device tool's carry:
# [".device", ".whl"]; the machine has no network). Fill .whl with Ray beforehand, here:
#   pip download ray==2.60.0 --python-version 3.12 --platform manylinux2014_x86_64 \
#       --only-binary=:all: -d .whl
#   bash benchmarks/batch_device.sh
# Steps: ROS 2 from the carried wheels (benchmarks/device_ros_setup.sh) and Ray into $WORK/raysite
# (no index, the machine's own packages kept) while the r50 model is exported (CPU work) and BAGS
# bags of FRAMES generated scenes each are written (bevfusion-make-bag --seeds, in parallel);
# `bevfusion-bench --backend gpu` (offline: median end-to-end ms -> frames/s); then
# `bevfusion-batch --backend gpu --workers 1 --gpus-per-worker 1` over the bags (embedded Ray).
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
python3 -m pip install --quiet --no-index --find-links "$PWD/.whl" --target "$WORK/raysite" ray==2.60.0 \
  > "$WORK/ray_install.log" 2>&1 || { tail -20 "$WORK/ray_install.log"; exit 1; }
# Only what the environment lacks stays in raysite (its numpy, protobuf, PyYAML, ... are kept).
python3 - "$WORK/raysite" <<'PY'
import importlib.metadata as md, pathlib, shutil, sys
site = pathlib.Path(sys.argv[1])
for dist in list(site.glob("*.dist-info")):
    name = dist.name.split("-")[0]
    try:
        if name.lower() == "ray":
            continue
        md.version(name)            # the environment has it: drop the copy
    except md.PackageNotFoundError:
        continue
    tops = {line.split(",")[0].split("/")[0] for line in (dist / "RECORD").read_text().splitlines()}
    for top in tops - {"", ".", ".."}:
        target = site / top
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
PY
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
