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
# GRAD_ACCUM, SAVE_STEPS and QUANTIZATION in the environment override them, and so does any train.py flag after train.sh.
#
# Two stages: a config with an `align:` section trains the projector alone first (`train.py --stage align`,
# into align.output_dir), then LoRA + projector from it (into training.output_dir). STAGE=align or
# STAGE=instruct runs only that stage; the environment overrides and the flags after train.sh go to every stage
# that runs, so a flag meant for one stage (--resume_from_checkpoint, --output_dir, ...) needs STAGE:
#   STAGE=instruct bash train.sh --resume_from_checkpoint latest
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=${CONFIG:-config.yaml}
PYTHON=${PYTHON:-python}
if [ ! -f "$CONFIG" ]; then
  echo "train.sh: config not found: $CONFIG" >&2
  exit 2
fi

# The stages to run, in order: both when the config has an align section, unless STAGE names one.
case "${STAGE:-}" in
  "") if grep -q '^align:' "$CONFIG"; then STAGES=(align instruct); else STAGES=(instruct); fi ;;
  align | instruct) STAGES=("$STAGE") ;;
  *) echo "train.sh: STAGE must be align or instruct (or unset: every stage of the config), got '$STAGE'" >&2
     exit 2 ;;
esac
for arg in "$@"; do
  case "$arg" in
    --stage | --stage=*)
      echo "train.sh: choose the stage with STAGE=align or STAGE=instruct, not $arg" >&2
      exit 2 ;;
    --resume_from_checkpoint | --resume_from_checkpoint=* | --resume-from-checkpoint | --resume-from-checkpoint=*)
      if [ "${#STAGES[@]}" -gt 1 ]; then
        echo "train.sh: $CONFIG has two stages and a checkpoint resumes one: STAGE=align or STAGE=instruct" \
             "bash train.sh $*" >&2
        exit 2
      fi ;;
  esac
done

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
add QUANTIZATION --quantization  # QUANTIZATION=nf4: QLoRA, the LLM's linear weights in 4-bit (pip install bitsandbytes)

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=(torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
else
  LAUNCH=("$PYTHON")
fi
for stage in "${STAGES[@]}"; do
  STAGE_FLAGS=()
  if [ "$stage" = align ]; then STAGE_FLAGS=(--stage align); fi
  "${LAUNCH[@]}" train.py --config "$CONFIG" ${STAGE_FLAGS[@]+"${STAGE_FLAGS[@]}"} \
    ${DEMO_FLAGS[@]+"${DEMO_FLAGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
done

if grep -q '^demo:' "$CONFIG" && [ "${STAGES[-1]}" = instruct ]; then
  "$PYTHON" -m demo.evaluate --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
fi
