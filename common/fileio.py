"""Writing files and folders whole: a reader sees the old version or the complete new one, never half of either.

- `staged_file(path)`: a temporary path beside `path`; on success it is flushed to disk and renamed onto `path`.
- `write_text` / `write_json`: one file, whole.
- `write_files(contents)`: several files written aside, then renamed one after the other (each file whole).
- `staged_folder(path)`: an empty folder beside `path`; on success it replaces `path` as one rename.
- `staged_files(folder)`: an empty folder inside `folder` to write several files into (by a library that
  writes a folder, say); on success each is moved into `folder`, whole, in name order, `last` ones last.

Temporary names start with "." and hold ".partial-", so an interrupted job leaves nothing a reader mistakes
for output, and any error removes what was staged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    """Force a written file's bytes to disk (before a rename or a manifest vouches for it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write to; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        fsync_file(temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(temp, path)
        fsync_folder(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, "\\n" line ends) to `path` whole."""
    with staged_file(path) as temp:
        temp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """Write `value` as JSON (non-ASCII kept, trailing newline) to `path` whole."""
    return write_text(path, json.dumps(value, ensure_ascii=False, indent=indent) + "\n")


def write_files(contents: Mapping[str | os.PathLike, Iterable[str]]) -> None:
    """Write every file aside first, then rename them (the last first): no file is ever half-written, and an
    error while writing any of them (disk full, say) leaves every existing file as it was."""
    with contextlib.ExitStack() as stack:
        for path, chunks in contents.items():
            temp = stack.enter_context(staged_file(path))  # renamed when the stack unwinds without error
            with open(temp, "w", encoding="utf-8", newline="\n") as f:
                for chunk in chunks:
                    f.write(chunk)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to `path`; on success it replaces `path`, on any error it is removed.

    An existing `path` is moved aside only once the new folder is complete, then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a checkpoint folder is ordinary data
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
        fsync_folder(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder inside `folder`; on success every file written into it is moved into
    `folder` (replacing a file of the same name), in name order with the names in `last` moved last; on any
    error nothing is moved. Other files of `folder` are left alone. For a folder that other writers share
    (a Trainer checkpoint holds the optimizer state beside our files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: (n in last, last.index(n) if n in last else 0, n)):
            fsync_file(staging / name)
            os.chmod(staging / name, 0o644)
            os.replace(staging / name, folder / name)
        fsync_folder(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
