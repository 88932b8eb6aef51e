"""Stdlib only: a benchmark typed as `python bench/NAME.py` with a Python that lacks the project's packages (the
system `python`, the environment not activated) runs itself again with the checkout's `.venv/bin/python`, the
environment README's install creates; with no such environment, it says what is missing in one line and exits
2, instead of failing with a traceback on its first import."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACKAGES = ("numpy", "torch", "transformers", "PIL", "safetensors")
VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
RERUN = "BENCH_RERUN_WITH_VENV"  # set on the second run: never a third


def require_packages(script: str, packages: tuple[str, ...] = PACKAGES, venv_python: Path = VENV_PYTHON) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if (venv_python.is_file() and RERUN not in os.environ
            and os.path.abspath(sys.executable) != os.path.abspath(venv_python)):
        print(f"{script}: this Python ({sys.executable}) lacks {', '.join(missing)}: running with {venv_python}",
              file=sys.stderr, flush=True)
        os.execve(venv_python, [str(venv_python), *sys.argv], {**os.environ, RERUN: "1"})
    print(f"{script}: this Python ({sys.executable}) lacks {', '.join(missing)}: activate the project's "
          "environment (. .venv/bin/activate) or install it: pip install -r requirements.txt", file=sys.stderr)
    raise SystemExit(2)
