#!/usr/bin/env bash
# The GPU benchmark rows of docs/BENCHMARKS.md, in one go: bash bench/gpu_suite.sh [OUTPUT_FILE]
# Appends one JSON line per benchmark to OUTPUT_FILE (default bench-results.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_FILE=${1:-bench-results.jsonl}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run() { echo "+ $*" >&2; "$PY" -m "$@" 2> >(grep -v -E "Warning|warn\(" >&2) | tee -a "$OUT_FILE"; }
run bench.gpu_checks
run bench.train_step --size 7b --batch-size 1 --seq-len 512 --gradient-checkpointing --steps 5 --warmup 2
run bench.train_step --size 7b --batch-size 8 --seq-len 512 --steps 8 --warmup 2
run bench.train_step --size 7b --batch-size 16 --seq-len 512 --gradient-checkpointing --steps 5 --warmup 2
run bench.generate --size 7b --new-tokens 64 --repeats 2
