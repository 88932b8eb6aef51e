"""Writing safetensors files whole and readable like every other output.

safetensors' own `save_file` creates its file with mode 0600 whatever the umask (safetensors 0.8), which
made exports, checkpoints, tiny test checkpoints and feature caches readable by their owner only.
`save_safetensors` writes through `common.fileio.staged_file`: the file appears whole, with mode 0644. It is the
project's one caller of `save_file` (tests/test_rules.py checks). A failed write (disk full, say) is an OSError
naming the file, as for any other file, not safetensors' own error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .fileio import staged_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to the safetensors file `path` (metadata {"format": "pt"} unless given), whole, mode 0644."""
    with staged_file(path) as temp:
        try:
            save_file(tensors, str(temp), metadata={"format": "pt"} if metadata is None else metadata)
        except SafetensorError as e:
            code = os_error_code(e)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(path)) from e
    return Path(path)


def os_error_code(error: SafetensorError) -> int | None:
    """The errno of an I/O failure, which safetensors reports as "... I/O error: No space left on device (os
    error 28)"; None for any other error."""
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None
