#!/usr/bin/env bash
# The README's main demo (after scripts/setup.sh): export the nuScenes ResNet50 model set in the
# CUDA-BEVFusion layout (once, cached in out/models), then run one real nuScenes frame through the
# whole CPU pipeline and write out/demo/detections.json + visualization.png.
# BEVFUSION_DATA overrides the example-data folder; BEVFUSION_PRESET=tiny makes it fast.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${BEVFUSION_DATA:-../shared/data/nuscenes-sample/cuda-bevfusion-example}"
preset="${BEVFUSION_PRESET:-nuscenes-r50}"
model="out/models/$preset-fp16"
if [ ! -d "$data" ]; then
  echo "demo: no example data at $data (set BEVFUSION_DATA to a CUDA-BEVFusion example-data folder)" >&2
  exit 1
fi
.venv/bin/bevfusion-inspect "$data"
if [ ! -f "$model/export.yaml" ]; then
  echo "demo: exporting the $preset model set to $model (seeded random weights: no trained weights here)"
  .venv/bin/bevfusion-export --preset "$preset" --precision fp16 --out "$model"
fi
.venv/bin/bevfusion-infer --model "$model" --data "$data" --out out/demo
