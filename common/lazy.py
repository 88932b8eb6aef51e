"""Package exports imported on first use, for packages whose light users must not pay for torch/transformers.

    __getattr__ = lazy_exports(__name__, {"QWenLMHeadModel": ".modeling_qwen", ...})

Measured on the 2-core CI machine: `import torch` about 2 s, `from transformers import Trainer` about 4 s;
process_image.py and `infer.py --help` start in well under a second because of this.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `exports[name]` (a module path, relative to `package` when it starts
    with ".") the first time `package.name` is asked for."""

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module hook PEP 562 names)
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
