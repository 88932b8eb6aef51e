#!/usr/bin/env bash
# Launch training. With no arguments: the CPU demo (config.yaml) from scratch to demo_eval.json.
#
#   bash train.sh                                   # the demo: tiny models, synthetic data, CPU, minutes
#   CONFIG=configs/qwen7b_coco.yaml bash train.sh   # the real recipe on every visible GPU
#   NPROC=2 bash train.sh --learning_rate 1e-4      # 2 processes; any train.py flag goes on top
#   bash train.sh --deepspeed configs/zero3.json    # DeepSpeed ZeRO-3 (pip install deepspeed; README: Scaling out)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash train.sh   # on the first of two machines; NODE_RANK=1 on the other
#
# One process (CPU, or one GPU) runs `python train.py`; several (NPROC, default: the visible GPUs), or DeepSpeed, run
# `python -m torch.distributed.run --nproc_per_node NPROC train.py` (torchrun). Several machines: the same command
# on each, with NNODES (machines), NODE_RANK (this one's number, 0..NNODES-1) and MASTER_ADDR/MASTER_PORT (node 0's
# address and a free port), or RDZV_ENDPOINT=host:port (torchrun's c10d rendezvous; RDZV_ID names the job) instead
# of MASTER_ADDR; the demo's preparation and evaluation run on node 0 only. The hyper-parameters come from the
# config (the seed recipe's are in configs/qwen7b_coco.yaml); LORA_R, LORA_ALPHA, LORA_DROPOUT, LR, PROJECTOR_LR,
# EPOCHS, BATCH_SIZE, GRAD_ACCUM, SAVE_STEPS and QUANTIZATION in the environment override them, and so does
# any train.py flag after train.sh.
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
case "${1:-}" in
  -h | --help)  # this header, then the flags train.py takes (every flag after train.sh goes to train.py)
    echo "usage: [VARIABLE=value ...] bash train.sh [train.py flags]"
    sed -n '2,23s/^# \{0,1\}//p' "$0"
    echo
    echo "train.py's flags (python train.py --help):"
    exec "$PYTHON" train.py --help ;;
esac
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

# Several machines: every node runs this script with the same NNODES and its own NODE_RANK.
NNODES=${NNODES:-1}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "train.sh: NNODES must be a positive number of machines, got '$NNODES'" >&2
  exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  if [ -z "${NODE_RANK:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
    echo "train.sh: NNODES=$NNODES needs NODE_RANK (this machine's number, 0 to $((NNODES - 1))) and MASTER_ADDR" \
         "(the address of node 0), or RDZV_ENDPOINT=host:port" >&2
    exit 2
  fi
fi
NODE_RANK=${NODE_RANK:-0}
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "train.sh: NODE_RANK must be a number from 0 to $((NNODES - 1)) (NNODES=$NNODES), got '$NODE_RANK'" >&2
  exit 2
fi

DEMO_FLAGS=()
if grep -q '^demo:' "$CONFIG"; then
  # The demo builds its own tiny checkpoints and synthetic data, then preprocesses them like real data: on node 0
  # only; the other nodes train on what it prepared (on several machines, the checkout on a shared filesystem), as
  # torchrun's rendezvous waits for node 0, which joins once the data is ready.
  if [ "$NODE_RANK" = 0 ]; then
    "$PYTHON" -m demo.prepare --config "$CONFIG"
    # With data.feature_cache (the demo's config), the frozen tower's features are computed here once per image.
    CACHE_FLAGS=()
    if grep -qE '^\s+feature_cache:' "$CONFIG"; then CACHE_FLAGS=(--cache-features); fi
    "$PYTHON" process_image.py --config "$CONFIG" ${CACHE_FLAGS[@]+"${CACHE_FLAGS[@]}"}
  fi
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

# DeepSpeed needs a launcher's environment (LOCAL_RANK, ...), also for one process.
DEEPSPEED=no
if grep -qE '^\s+deepspeed:' "$CONFIG"; then DEEPSPEED=yes; fi
for arg in "$@"; do
  case "$arg" in --deepspeed | --deepspeed=*) DEEPSPEED=yes ;; esac
done
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d
          --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-train}")
elif [ "$NNODES" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
          --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
elif [ "$NPROC" -gt 1 ] || [ "$DEEPSPEED" = yes ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29500}")
else
  LAUNCH=("$PYTHON")
fi
for stage in "${STAGES[@]}"; do
  STAGE_FLAGS=()
  if [ "$stage" = align ]; then STAGE_FLAGS=(--stage align); fi
  "${LAUNCH[@]}" train.py --config "$CONFIG" ${STAGE_FLAGS[@]+"${STAGE_FLAGS[@]}"} \
    ${DEMO_FLAGS[@]+"${DEMO_FLAGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
done

if grep -q '^demo:' "$CONFIG" && [ "${STAGES[-1]}" = instruct ] && [ "$NODE_RANK" = 0 ]; then
  "$PYTHON" -m demo.evaluate --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@"
fi
