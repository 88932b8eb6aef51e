#!/usr/bin/env bash
# The GPU benchmark rows of docs/BENCHMARKS.md, in one go: bash bench/gpu_suite.sh [OUTPUT_FILE]
# Appends one JSON line per benchmark to OUTPUT_FILE (default bench-results.jsonl).
set -uo pipefail
case "${1:-}" in
  -h | --help)
    echo "usage: bash bench/gpu_suite.sh [OUTPUT_FILE]"
    echo "Runs the GPU benchmarks of docs/BENCHMARKS.md, appending one JSON line each to OUTPUT_FILE"
    echo "(default bench-results.jsonl, relative to the checkout)."
    exit 0 ;;
  -*) echo "gpu_suite.sh: unknown option $1 (usage: bash bench/gpu_suite.sh [OUTPUT_FILE])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT_FILE=${1:-bench-results.jsonl}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*" >&2; "$PY" -m "$@" 2> >(grep -v -E "Warning|warn\(" >&2) | tee -a "$OUT_FILE"; }
run bench.gpu_checks
# Qwen-7B + CLIP ViT-L/14 (the verified pair): 512-token samples (10 prompt + 256 image + 246 text).
QWEN_CLIP="--llm qwen-7b --vision clip-vit-l14"
run bench.train_step $QWEN_CLIP --batch-size 1 --seq-len 512 --gradient-checkpointing --steps 5 --warmup 2
run bench.train_step $QWEN_CLIP --batch-size 8 --seq-len 512 --steps 8 --warmup 2
run bench.train_step $QWEN_CLIP --batch-size 16 --seq-len 512 --gradient-checkpointing --steps 5 --warmup 2
# QLoRA (README, QLoRA): 4-bit NF4 base weights, next to bf16 at the same batch with checkpointing.
run bench.train_step $QWEN_CLIP --batch-size 8 --seq-len 512 --gradient-checkpointing --steps 5 --warmup 2
run bench.train_step $QWEN_CLIP --batch-size 1 --seq-len 512 --gradient-checkpointing --quantization nf4 --steps 5 --warmup 2
run bench.train_step $QWEN_CLIP --batch-size 8 --seq-len 512 --gradient-checkpointing --quantization nf4 --steps 5 --warmup 2
run bench.generate $QWEN_CLIP --batch-sizes 1 8 32 --new-tokens 64 --repeats 2
# Qwen2.5-7B-Instruct + SigLIP so400m: 985-token samples (10 prompt + 729 image + the same 246 text). Batch 4 without
# checkpointing moves about the tokens of QWen's batch 8 x 512 (3,940 against 4,096) in a step; batch 8 needs
# checkpointing on an 80 GB card. Prompts for generation: 729 image + 64 text tokens.
QWEN25_SIGLIP="--llm qwen2.5-7b --vision siglip-so400m"
run bench.train_step $QWEN25_SIGLIP --batch-size 1 --gradient-checkpointing --steps 5 --warmup 2
run bench.train_step $QWEN25_SIGLIP --batch-size 4 --steps 8 --warmup 2
run bench.train_step $QWEN25_SIGLIP --batch-size 8 --gradient-checkpointing --steps 5 --warmup 2
run bench.generate $QWEN25_SIGLIP --batch-sizes 1 8 32 --new-tokens 64 --repeats 2
# The small-GPU recipe (configs/qwen2.5-1.5b_siglip.yaml: 2 samples of about 1,100 tokens a step, ~300 supervised,
# checkpointing): its peak memory against the 12 GB that file's arithmetic promises.
run bench.train_step --llm qwen2.5-1.5b --vision siglip-so400m --batch-size 2 --seq-len 1100 --answer-frac 0.8 \
  --gradient-checkpointing --steps 5 --warmup 2
# The serving path: the `model.export --format llava` folder of the QWen-7B + CLIP model in vLLM, same workload as
# its bench.generate row above (one image + text, about 320 prompt tokens, 64 greedy new tokens), at batch 1 and 32.
# Only where vLLM is installed (`pip install vllm`): without it the suite runs on and says so. Written without a
# GPU to try it on (no GPU was lent to the session that added it): its first run on a GPU is its test.
if "$PY" -c "import vllm" 2>/dev/null; then
  run bench.vllm_generate --size 7b --batch-sizes 1 32 --new-tokens 64 --repeats 2
else
  echo "+ bench.vllm_generate skipped: vllm is not installed (pip install vllm)" >&2
fi
