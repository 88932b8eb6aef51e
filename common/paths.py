"""Outputs that must not be inputs, and folders that may be deleted.

- `same_file(a, b)`, `is_within(path, folder)`: compared as resolved paths (symbolic links followed,
  relative made absolute), and by device and inode when both exist (hard links, bind mounts).
- `mark_created(folder, by)` writes a marker file into a folder this project created; `created_by(folder)`
  reads it back. A folder is deleted or replaced wholesale only when it holds the marker: an output option
  pointed at the wrong folder (the checkout, a home folder, a trained run) gets an error, never `rmtree`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MARKER_FILE = ".created-by-qwen-vl.json"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(path))))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name the same file (or folder), whatever the spelling."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path` is `folder` itself or anything inside it."""
    path, folder = _resolved(path), _resolved(folder)
    if path == folder or folder in path.parents:
        return True
    if not folder.exists():
        return False
    return any(os.path.exists(p) and os.path.samefile(p, folder) for p in (path, *path.parents))


def mark_created(folder: str | os.PathLike, by: str) -> Path:
    """Record in `folder` that this project created it (`by`: which command). Returns the marker's path."""
    marker = Path(folder) / MARKER_FILE
    marker.write_text(json.dumps({"created_by": by}) + "\n", encoding="utf-8")
    return marker


def created_by(folder: str | os.PathLike) -> str | None:
    """The command that created `folder` according to its marker; None when there is no (readable) marker."""
    marker = Path(folder) / MARKER_FILE
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("created_by")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
