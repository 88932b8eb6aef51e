"""Stdlib only: a benchmark run by a Python without the project's packages (the system `python` instead of the
environment's) says so in one line and exits 2, instead of failing with a traceback on its first import."""

from __future__ import annotations

import importlib.util
import sys

PACKAGES = ("numpy", "torch", "transformers", "PIL", "safetensors")


def require_packages(script: str, packages: tuple[str, ...] = PACKAGES) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{script}: this Python ({sys.executable}) lacks {', '.join(missing)}: activate the project's "
              "environment (. .venv/bin/activate) or install it: pip install -r requirements.txt", file=sys.stderr)
        raise SystemExit(2)
