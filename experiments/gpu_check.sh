#!/usr/bin/env bash
# The design card's command on a GPU (strategy=gpu, the backbone on CUDA, CUDA-synchronised timing),
# then its checkpoint evaluated with latency calibration on and off. Sized for a few minutes of a lent
# GPU: 60 val questions (20 timed at every configuration), 600 steps, 100 test questions.
#   bash experiments/gpu_check.sh [OUT]      (packages the device image lacks: .whl/, see README)
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
WORK=/tmp/gpu_work
mkdir -p "$OUT" "$WORK"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/machine.txt"
step() {  # name, command...: the command's log under $OUT, its wall time and exit code on screen
  local name=$1; shift
  local t0=$(date +%s%N)
  "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%-12s rc=%s wall=%ss\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000000 ))" | tee -a "$OUT/steps.txt"
  tr '\r' '\n' < "$WORK/$name.log" | grep -v "req/s\|it/s\]" | tail -15
  return $rc
}
step train python3 -m lvlm_ctrl.train controller=grpo budget=uniform strategy=gpu model.device=cuda \
  data.limit=60 profile.measured=20 trainer.max_steps=600 logger=csv \
  profile.path=$WORK/profile hydra.run.dir=$WORK/train || { cp "$WORK/train.log" "$OUT/"; exit 1; }
for cal in default off; do
  step "eval_$cal" python3 -m lvlm_ctrl.evaluate controller=grpo model.device=cuda calibration=$cal \
    ckpt=$WORK/train/checkpoints/best.ckpt data.split=test data.limit=100 hydra.run.dir=$WORK/eval_$cal
  cp "$WORK/eval_$cal/eval_summary.json" "$OUT/eval_$cal.json" 2>/dev/null
done
step lookup python3 -m lvlm_ctrl.train controller=lookup model.device=cuda data.limit=60 profile.measured=20 \
  profile.path=$WORK/profile hydra.run.dir=$WORK/lookup
step eval_lookup python3 -m lvlm_ctrl.evaluate controller=lookup model.device=cuda \
  controller.table=$WORK/lookup/lookup_table.json data.split=test data.limit=100 hydra.run.dir=$WORK/eval_lookup
cp "$WORK/eval_lookup/eval_summary.json" "$OUT/eval_lookup.json" 2>/dev/null
cp "$WORK/train.log" "$OUT/train.log"
