#!/usr/bin/env bash
# Device debugging aid: stage-by-stage and box-level GPU vs CPU comparison on a tiny export
# (fp32 and fp16) and, when MODEL_DIR names one, on that export too.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
data=.device/data/cuda-bevfusion-example
[ -f /tmp/tiny/export.yaml ] || python3 -m bevfusion_ros.tools.export --preset tiny --out /tmp/tiny --seed 11 | tail -1
for model in /tmp/tiny ${MODEL_DIR:-}; do
  for precision in fp32 fp16; do
    echo "== $model $precision"
    python3 -m bevfusion_ros.tools.parity "$model" "$data" --precision $precision 2>&1 | grep -v "^engine backend"
  done
done
