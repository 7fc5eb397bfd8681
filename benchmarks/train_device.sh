#!/usr/bin/env bash
# Issue 8 on the GPU machine: train a preset on generated scenes, export it, evaluate on held-out
# seeds through the deploy pipeline (GPU and CPU). Writes under $OUT (default out/train-device).
#   PRESET=tiny SCENES=0:300 EPOCHS=3 EVAL=100000:100030 bash benchmarks/train_device.sh
set -uo pipefail
OUT="${OUT:-out/train-device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
preset="${PRESET:-tiny}"
python3 -m bevfusion_ros.tools.train --preset "$preset" --scenes "${SCENES:-0:300}" --epochs "${EPOCHS:-3}" \
  --device cuda --amp --workers "${WORKERS:-8}" --cache /tmp/scene-cache --lr "${LR:-2e-3}" \
  --out "$OUT/train" --export > "$OUT/train.log" 2>&1
echo "train rc=$?"; grep -v "^epoch" "$OUT/train.log" | tail -15; grep "^epoch" "$OUT/train.log" | awk "NR % 50 == 1" | tail -10
for backend in gpu cpu; do
  python3 -m bevfusion_ros.tools.eval --model "$OUT/train/model" --seeds "${EVAL:-100000:100030}" \
    --backend "$backend" --json "$OUT/eval_$backend.json" > "$OUT/eval_$backend.log" 2>&1
  echo "eval $backend rc=$?"; tail -22 "$OUT/eval_$backend.log"
done
