#!/usr/bin/env bash
# Issue 8 on the GPU machine: train a preset on generated scenes in time-limited calls.
#
#   TIME_LIMIT=500 SCENES=0:18000 BATCH=4 bash benchmarks/train_device.sh     # carry .train
#
# With .train/model.pt (+ train_state.pt) present, the run resumes there (mid-epoch included);
# the checkpoint after this call is written to $OUT/train (copy it back into .train for the
# next call). Every call must use the same PRESET/SCENES/EPOCHS/BATCH/LR/MAX_STEPS (they fix
# the schedule).
# PROFILE=1 first times training steps (benchmarks/train_profile.py). EVAL=A:B (with the
# nuscenes-devkit wheels in .whl) exports the finished model and evaluates it on those held-out
# seeds with the GPU pipeline.
set -uo pipefail
OUT="${OUT:-out/train-device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
preset="${PRESET:-tiny}"
if [ "${PROFILE:-0}" = 1 ]; then
  python3 benchmarks/train_profile.py --preset "$preset" --scenes 24 --steps 20 --batches 1,4 \
    --workers 14 2>&1 | grep -v Warning | tee "$OUT/profile.log" | grep -v "^ "
fi
resume=()
[ -f .train/model.pt ] && resume=(--resume .train)
python3 -m bevfusion_ros.tools.train --preset "$preset" --scenes "${SCENES:-0:18000}" \
  --epochs "${EPOCHS:-1}" --batch-size "${BATCH:-4}" --lr "${LR:-2e-3}" --device cuda --amp \
  --workers "${WORKERS:-14}" --threads 2 --time-limit "${TIME_LIMIT:-500}" \
  ${MAX_STEPS:+--max-steps "$MAX_STEPS"} --log-every "${LOG_EVERY:-50}" \
  --out "$OUT/train" "${resume[@]}" > "$OUT/train.log" 2>&1
echo "train rc=$?"; grep -v Warning "$OUT/train.log" | tail -40
if [ -n "${EVAL:-}" ] && [ -d "$OUT/train" ] && ! grep -q "^paused" "$OUT/train.log"; then
  python3 -m bevfusion_ros.tools.export --preset "$preset" --checkpoint "$OUT/train/model.pt" \
    --out /tmp/trained-model > "$OUT/export.log" 2>&1
  echo "export rc=$?"; tar -C /tmp -cf "$OUT/model.tar" trained-model
  python3 -m bevfusion_ros.tools.eval --model /tmp/trained-model --seeds "$EVAL" --backend gpu \
    --workers 12 --progress-every 50 --json "$OUT/eval_gpu.json" > "$OUT/eval_gpu.log" 2>&1
  echo "eval gpu rc=$?"; tail -25 "$OUT/eval_gpu.log"
fi
