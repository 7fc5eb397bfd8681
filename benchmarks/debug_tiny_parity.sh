#!/usr/bin/env bash
# Device debugging aid: stage-by-stage GPU vs CPU comparison on a tiny export (fp32 and fp16).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -f /tmp/tiny/export.yaml ] || python3 -m bevfusion_ros.model.export --preset tiny --out /tmp/tiny --seed 11 | tail -1
for precision in fp32 fp16; do
  echo "== $precision"
  python3 benchmarks/pipeline_parity.py /tmp/tiny .device/data/cuda-bevfusion-example $precision 2>&1 | grep -v "^engine backend"
done
