"""Files that are read together, replaced together: `publish_together({path: chunks, ...})`.

A training file and its validation file must come from the same run. Renaming them into place one after the
other leaves, after a crash between the two renames, a new training file beside an old validation file. Here
every path is a symbolic link through one pointer, and the pointer is the only thing a run switches:

    data/train.jsonl        -> .train.jsonl.files/current/train.jsonl
    data/train.val.jsonl    -> .train.jsonl.files/current/train.val.jsonl
    data/.train.jsonl.files/
        current             -> gen-20260101-120000-1a2b3c4d      (replaced by one rename)
        gen-20260101-120000-1a2b3c4d/train.jsonl, train.val.jsonl

A run writes a complete new generation folder first (fsynced), then renames a new `current` link over the old
one, then deletes the older generations. Killed at any point, the paths read the old set or the new set,
never a mix. Readers open the paths as ordinary files (the links are followed).

The first run over plain files (written by an older version, or by hand) adopts them first: they are hard
linked (or copied) into a generation of their own, `current` points at it, and each plain file is replaced by
its link, whose content is the same; only then is the new set published. So the paths never mix there either.

The pointer folder (`.<first name>.files`, beside the first path) belongs to this module: only its `gen-*`
and `.partial-*` entries are ever deleted. POSIX only (symbolic links).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from common.fileio import fsync_file, fsync_folder

POINTER = "current"
GENERATION_PREFIX = "gen-"
PARTIAL_PREFIX = ".partial-"


def store_of(first: Path) -> Path:
    """The folder that holds the generations of the set whose first path is `first`."""
    return first.parent / f".{first.name}.files"


def _member_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}-{name}" for i, name in enumerate(names)]


def _link_text(path: Path, store: Path, member: str) -> str:
    return os.path.relpath(store / POINTER / member, path.parent)


def _replace_with_link(path: Path, text: str) -> None:
    """Make `path` a symbolic link with target `text`, in one rename (whatever `path` was before)."""
    temp = path.parent / f".{path.name}.link-{secrets.token_hex(4)}"
    os.symlink(text, temp)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _new_generation_name() -> str:
    return f"{GENERATION_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def _stage(store: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=store))
    os.chmod(staging, 0o755)
    return staging


def _commit(store: Path, staging: Path) -> str:
    name = _new_generation_name()
    os.replace(staging, store / name)
    fsync_folder(store)
    return name


def _switch(store: Path, generation: str) -> None:
    """Point `current` at `generation`: one rename of a new link over the old one."""
    _replace_with_link(store / POINTER, generation)


def _is_our_link(path: Path, text: str) -> bool:
    return path.is_symlink() and os.readlink(path) == text


def _adopt(paths: list[Path], members: list[str], store: Path, texts: list[str]) -> None:
    """Turn every path that is not yet our link into one, without changing what any path reads."""
    staging = _stage(store)
    try:
        for path, member in zip(paths, members):
            if not path.exists():  # follows links: a missing file or a dangling link stays missing
                continue
            source = os.path.realpath(path)
            try:
                os.link(source, staging / member)
            except OSError:  # another file system, or hard links not allowed: a copy
                shutil.copyfile(source, staging / member)
                fsync_file(staging / member)
        generation = _commit(store, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _switch(store, generation)
    for path, text in zip(paths, texts):
        if not _is_our_link(path, text):
            _replace_with_link(path, text)


def _remove_old(paths: list[Path], store: Path, keep: str) -> None:
    """Delete the generations other than `keep` and what killed runs left behind (staging folders, links
    not yet renamed into place)."""
    for path in paths:
        for leftover in path.parent.glob(f".{path.name}.link-*"):
            if leftover.is_symlink():
                leftover.unlink(missing_ok=True)
    for leftover in store.glob(f".{POINTER}.link-*"):
        if leftover.is_symlink():
            leftover.unlink(missing_ok=True)
    for entry in store.iterdir():
        if entry.name in (keep, POINTER):
            continue
        if entry.name.startswith((GENERATION_PREFIX, PARTIAL_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def remove_partials(path: str | os.PathLike) -> None:
    """Delete the temporary files that killed writers of `path` left beside it (`common.fileio.staged_file`
    names them `.<name>.partial-*`)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.partial-*"):
        if leftover.is_file() and not leftover.is_symlink():
            leftover.unlink(missing_ok=True)


def publish_together(contents: Mapping[str | os.PathLike, Iterable[str]]) -> None:
    """Write the files of `contents` (UTF-8 text chunks, "\\n" line ends) as one set: the paths switch from
    the previous set to this one in a single rename (see the module docstring). On an error before the
    switch, the previous set is left as it was."""
    paths = [Path(os.path.abspath(p)) for p in contents]
    chunks = list(contents.values())
    members = _member_names(paths)
    store = store_of(paths[0])
    texts = [_link_text(path, store, member) for path, member in zip(paths, members)]
    created = not store.exists()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    store.mkdir(exist_ok=True)
    try:
        staging = _stage(store)
        try:
            for member, parts in zip(members, chunks):
                with open(staging / member, "w", encoding="utf-8", newline="\n") as f:
                    for part in parts:
                        f.write(part)
                fsync_file(staging / member)
                os.chmod(staging / member, 0o644)
            generation = _commit(store, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except BaseException:
        if created:
            shutil.rmtree(store, ignore_errors=True)
        raise
    if not all(_is_our_link(path, text) for path, text in zip(paths, texts)):
        _adopt(paths, members, store, texts)
    _switch(store, generation)
    _remove_old(paths, store, keep=generation)
