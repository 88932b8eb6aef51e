#!/usr/bin/env bash
# Launch training. With no arguments: the CPU demo (config.yaml) from scratch to demo_eval.json.
#
#   bash train.sh                                   # the demo: tiny models, synthetic data, CPU, minutes
#   CONFIG=configs/qwen7b_coco.yaml bash train.sh   # the real recipe on every visible GPU
#   NPROC=2 bash train.sh --learning_rate 1e-4      # 2 processes; any train.py flag goes on top
#   bash train.sh --deepspeed configs/zero2.json    # DeepSpeed ZeRO-2 (pip install deepspeed)
#
# One process (CPU, or one GPU) runs `python train.py`; several (NPROC, default: the visible GPUs) run
# `torchrun --nproc_per_node NPROC train.py`. The hyper-parameters come from the config (the seed recipe's
# are in configs/qwen7b_coco.yaml); LORA_R, LORA_ALPHA, LORA_DROPOUT, LR, PROJECTOR_LR, EPOCHS, BATCH_SIZE,
# GRAD_ACCUM and SAVE_STEPS in the environment override them, and so does any train.py flag after train.sh.
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=${CONFIG:-config.yaml}
PYTHON=${PYTHON:-python}
if [ ! -f "$CONFIG" ]; then
  echo "train.sh: config not found: $CONFIG" >&2
  exit 2
fi

if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      NPROC=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    else
      NPROC=$(nvidia-smi -L | grep -c '^GPU')
    fi
  else
    NPROC=1
  fi
fi

DEMO_FLAGS=()
if grep -q '^demo:' "$CONFIG"; then
  # The demo builds its own tiny checkpoints and synthetic data, then preprocesses them like real data.
  "$PYTHON" -m demo.prepare --config "$CONFIG"
  "$PYTHON" process_image.py --config "$CONFIG"
  # Run again, the demo replaces its own previous run (train.py says what it deletes). Only the demo: any other
  # config into a non-empty output_dir is refused unless resumed or given --overwrite_output_dir explicitly.
  DEMO_FLAGS=(--overwrite_output_dir)
fi

# Environment overrides of the config's hyper-parameters, passed only when set (flags after train.sh win too).
OVERRIDES=()
add() { if [ -n "${!1:-}" ]; then OVERRIDES+=("$2" "${!1}"); fi; }
add LORA_R --lora_r; add LORA_ALPHA --lora_alpha; add LORA_DROPOUT --lora_dropout
add LR --learning_rate; add PROJECTOR_LR --projector_learning_rate; add EPOCHS --num_train_epochs
add BATCH_SIZE --per_device_train_batch_size; add GRAD_ACCUM --gradient_accumulation_steps; add SAVE_STEPS --save_steps

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
else
  LAUNCH=("$PYTHON")
fi
"${LAUNCH[@]}" train.py --config "$CONFIG" ${DEMO_FLAGS[@]+"${DEMO_FLAGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"

if grep -q '^demo:' "$CONFIG"; then
  "$PYTHON" -m demo.evaluate --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
fi
