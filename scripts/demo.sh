#!/usr/bin/env bash
# The README's main demo (after scripts/setup.sh): load, validate and summarise a real nuScenes
# frame in CUDA-BEVFusion example-data layout. BEVFUSION_DATA overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${BEVFUSION_DATA:-../shared/data/nuscenes-sample/cuda-bevfusion-example}"
if [ ! -d "$data" ]; then
  echo "demo: no example data at $data (set BEVFUSION_DATA to a CUDA-BEVFusion example-data folder)" >&2
  exit 1
fi
.venv/bin/bevfusion-inspect "$data"
