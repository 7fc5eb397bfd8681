#!/usr/bin/env bash
# The README's main demo (after scripts/setup.sh), through ROS 2: export the nuScenes ResNet50
# model set in the CUDA-BEVFusion layout (once, cached in out/models; seeded random weights: the
# project has no trained weights yet), convert the example frame into a rosbag2 MCAP bag, start
# bevfusion_node, replay the bag into it, record its outputs and write out/demo/detections.mcap,
# detections.json and visualization.png, then print a summary (frames in, detections out,
# latency per stage). BEVFUSION_DATA overrides the example-data folder; BEVFUSION_PRESET=tiny
# makes it fast; BEVFUSION_BACKEND picks the node's backend (default auto).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${BEVFUSION_DATA:-../shared/data/nuscenes-sample/cuda-bevfusion-example}"
exec .venv/bin/python -m bevfusion_ros.tools.demo --data "$data" --preset "${BEVFUSION_PRESET:-nuscenes-r50}" \
  --backend "${BEVFUSION_BACKEND:-auto}" --out out/demo
