#!/usr/bin/env bash
# Launch training. With no arguments: the CPU demo (config.yaml) from scratch to demo_eval.json.
#
#   bash train.sh                                   # the demo: tiny models, synthetic data, CPU, minutes
#   CONFIG=configs/qwen7b_coco.yaml bash train.sh   # the real recipe on every visible GPU
#   NPROC=2 bash train.sh --learning_rate 1e-4      # 2 processes; any train.py flag goes on top
#   bash train.sh --deepspeed configs/zero2.json    # DeepSpeed ZeRO-2 (pip install deepspeed)
#
# One process (CPU, or one GPU) runs `python train.py`; several (NPROC, default: the visible GPUs) run
# `torchrun --nproc_per_node NPROC train.py`. For the real recipe the seed hyper-parameters below are the
# defaults, each overridable from the environment (LORA_R=32 bash train.sh) or by a flag after train.sh.
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

RECIPE=()
if grep -q '^demo:' "$CONFIG"; then
  # The demo builds its own tiny checkpoints and synthetic data, then preprocesses them like real data.
  "$PYTHON" -m demo.prepare --config "$CONFIG"
  "$PYTHON" process_image.py --config "$CONFIG"
else
  # The seed recipe of the real run (one epoch over ~77k LLaVA + 50k AIC samples).
  RECIPE=(
    --lora_r "${LORA_R:-64}" --lora_alpha "${LORA_ALPHA:-16}" --lora_dropout "${LORA_DROPOUT:-0.05}"
    --learning_rate "${LR:-2e-4}" --projector_learning_rate "${PROJECTOR_LR:-1e-3}"
    --num_train_epochs "${EPOCHS:-1}" --per_device_train_batch_size "${BATCH_SIZE:-8}"
    --gradient_accumulation_steps "${GRAD_ACCUM:-2}" --save_steps "${SAVE_STEPS:-500}"
  )
fi

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
else
  LAUNCH=("$PYTHON")
fi
"${LAUNCH[@]}" train.py --config "$CONFIG" ${RECIPE[@]+"${RECIPE[@]}"} "$@"

if grep -q '^demo:' "$CONFIG"; then
  "$PYTHON" -m demo.evaluate --config "$CONFIG"
fi
