"""Writing safetensors files whole and readable like every other output.

safetensors' own `save_file` creates its file with mode 0600 whatever the umask (safetensors 0.8), which
made exports, checkpoints, tiny test checkpoints and feature caches readable by their owner only.
`save_safetensors` writes through `common.fileio.staged_file`: the file appears whole, with mode 0644. It is the
project's one caller of `save_file` (tests/test_rules.py checks).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .fileio import staged_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to the safetensors file `path` (metadata {"format": "pt"} unless given), whole, mode 0644."""
    with staged_file(path) as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"} if metadata is None else metadata)
    return Path(path)
