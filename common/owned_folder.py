"""A folder that one command writes whole and may later replace, without losing anything that is not its own.

    with owned_folder(out, "model.export", overwrite=True) as staging:
        ...write every file of the new folder into `staging`...

Guarantees (POSIX: flock and rename):
- One writer per folder. `.NAME.lock` beside it is held (flock) for the whole run; a second writer gets
  `FolderBusyError`, naming the holder (pid, host), and changes nothing.
- Written aside. The staging folder `.NAME.partial-XXXXXXXX` holds this project's marker (common.paths) from
  the start and, written last, the list of its files (`MANIFEST_FILE`): a staging folder with its list is
  complete. On an error the staging folder is removed.
- Replaced only when everything in the folder is on its list. Anything else (evaluation results, a user's
  notes) is named, and nothing is changed (`NotReplaceableError`); a non-empty folder without a list is never
  replaced. Checked before the work and again just before the swap.
- The swap: the previous folder moves into `.NAME.old-XXXXXXXX` (the staging folder's suffix), the staging
  folder to NAME, then the old one is deleted. An error between the two renames moves the previous folder
  back. After a kill between them, the next writer finishes the swap when the staging folder is complete, or
  else restores the previous folder, and says which.
- What dead writers left is cleaned by the next one, which says so: their staging and old folders, known by
  their exact names and our marker; no live writer can own them while the lock is ours. Any other
  `.NAME.partial-*` or `.NAME.old-*` (an older version's) is named and left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from .fileio import fsync_file, fsync_folder, write_json
from .paths import created_by, mark_created

MANIFEST_FILE = ".written-by-qwen-vl.json"
STAGING, OLD = "partial", "old"  # .NAME.partial-XXXXXXXX, .NAME.old-XXXXXXXX
MAX_NAMED = 10


class FolderBusyError(Exception):
    """Another live process is writing the folder."""


class NotReplaceableError(FileExistsError):
    """The folder holds something its writer did not write, or is not empty and may not be replaced."""


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The list of files
# --------------------------------------------------------------------------------------------------


def listed_files(folder: str | os.PathLike, by: str) -> set[str] | None:
    """The files (relative POSIX paths) that `by` wrote into `folder`, from its list; None without a list."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("written_by") != by:
        return None
    if not isinstance(manifest.get("files"), list):
        return None
    return {f for f in manifest["files"] if isinstance(f, str)}


def _write_manifest(folder: Path, by: str) -> None:
    """List every file of `folder` (each flushed to disk first), then write the list: the folder is complete."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in files:
        fsync_file(folder / name)
    for sub in {folder / PurePosixPath(name).parent for name in files}:
        fsync_folder(sub)
    write_json(folder / MANIFEST_FILE, {"written_by": by, "files": files})


def _is_complete(folder: Path, by: str) -> bool:
    """Every file on `by`'s list of `folder` is there."""
    files = listed_files(folder, by)
    return files is not None and all((folder / name).is_file() for name in files)


def _restorable(folder: Path, by: str) -> bool:
    """A previous folder that a swap moved aside whole: complete by its list, or empty."""
    return folder.is_dir() and not folder.is_symlink() and (_is_complete(folder, by) or not any(folder.iterdir()))


def foreign_entries(folder: Path, listed: set[str]) -> list[str]:
    """What `folder` holds beyond the files of `listed` and their folders: relative paths, a folder as "name/"
    (a symbolic link is never a listed file)."""
    listed = listed | {MANIFEST_FILE}
    folders = {str(parent) for name in listed for parent in PurePosixPath(name).parents if str(parent) != "."}
    found: list[str] = []

    def walk(current: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(current), key=lambda e: e.name):
            name = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if name in folders:
                    walk(Path(entry.path), name + "/")
                else:
                    found.append(name + "/")
            elif entry.is_symlink() or not entry.is_file() or name not in listed:
                found.append(name)

    walk(folder, "")
    return found


def _named(entries: list[str]) -> str:
    more = len(entries) - MAX_NAMED
    return ", ".join(entries[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def check_replaceable(path: Path, by: str, overwrite: bool) -> None:
    """`path` is absent, an empty folder, or (with `overwrite`) a folder of files all on `by`'s list.
    NotReplaceableError naming what stands in the way otherwise."""
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise NotReplaceableError(f"{path} is a symbolic link; name the folder itself")
    if not path.is_dir():
        raise NotReplaceableError(f"{path} is not a folder; name a folder")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise NotReplaceableError(f"{path} exists and is not empty (pass --overwrite to replace what {by} wrote there)")
    listed = listed_files(path, by)
    if listed is None:
        raise NotReplaceableError(
            f"--overwrite: {path} is not a previous output of {by} (no {MANIFEST_FILE}, the list of the files {by} "
            f"wrote; outputs of older versions have none either): it is left alone: remove it yourself or name "
            "another folder")
    foreign = foreign_entries(path, listed)
    if foreign:
        raise NotReplaceableError(
            f"--overwrite: {path} holds what {by} did not write: {_named(foreign)}; nothing was changed: move "
            "them out, or name another folder")


# --------------------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _acquire(lock: Path, by: str, target: Path) -> int:
    """An open descriptor of `lock` holding its exclusive flock. FolderBusyError when a live process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusyError(f"another {by} is writing {target} ({holder}); wait for it to finish or "
                                  "name another folder") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # not a file that the previous holder unlinked after we opened it
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def _writer_lock(path: Path, by: str) -> Iterator[None]:
    lock = _lock_path(path)
    fd = _acquire(lock, by, path)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiting opener sees another inode and retries
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# What dead writers left
# --------------------------------------------------------------------------------------------------


def _aside(path: Path, kind: str, suffix: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{suffix}"


def _leftovers(path: Path, kind: str) -> tuple[dict[str, Path], list[Path]]:
    """Folders beside `path` named `.NAME.<kind>-*`: (ours by name, suffix -> folder; the others)."""
    prefix = f".{path.name}.{kind}-"
    ours, others = {}, []
    for entry in sorted(path.parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        suffix = entry.name[len(prefix):]
        if re.fullmatch(r"[0-9a-f]{8}", suffix):
            ours[suffix] = entry
        else:
            others.append(entry)
    return ours, others


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return f"{total / 1024**3:.2f} GiB" if total >= 1024**3 else f"{total / 1024**2:.1f} MiB"


def _delete_old(old: Path, name: str) -> None:
    """Delete an old folder: the previous folder in it first, our marker last (a kill midway leaves it ours)."""
    if (old / name).exists():
        shutil.rmtree(old / name)
    shutil.rmtree(old)


def _is_ours(folder: Path, by: str) -> bool:
    """Ours when marked; an empty folder (killed before its marker was written) loses nothing when deleted."""
    return created_by(folder) == by or not any(folder.iterdir())


def _finish_swap(path: Path, old: Path, staging: Path | None, by: str, say: Callable[[str], None]) -> None:
    """`path` is missing and its previous folder is whole in `old`: a writer was killed between the two renames."""
    if staging is not None and created_by(staging) == by and _is_complete(staging, by):
        os.replace(staging, path)
        say(f"a killed {by} had moved {path} aside: its new output was complete, so the replacement is "
            "completed (the new one is in place, the previous one deleted)")
    else:
        os.replace(old / path.name, path)
        say(f"a killed {by} had moved {path} aside before its new output was complete: the previous one "
            "is restored")
    fsync_folder(path.parent)


def _recover(path: Path, by: str, say: Callable[[str], None]) -> None:
    """Finish or roll back a swap that a killed writer left half done, and delete what dead writers left.
    Only under the writer lock (so no live writer owns any of it)."""
    olds, other_olds = _leftovers(path, OLD)
    stagings, other_stagings = _leftovers(path, STAGING)
    for suffix, old in olds.items():
        if not _is_ours(old, by):
            other_olds.append(old)
            continue
        if not os.path.lexists(path) and _restorable(old / path.name, by):
            _finish_swap(path, old, stagings.get(suffix), by, say)
        _delete_old(old, path.name)
    for staging in stagings.values():
        if not staging.exists():  # put in place by _finish_swap
            continue
        if not _is_ours(staging, by):
            other_stagings.append(staging)
            continue
        size = _size(staging)
        shutil.rmtree(staging)
        say(f"deleted {staging}, left by a killed {by} ({size})")
    for other in sorted(other_olds + other_stagings):
        say(f"left alone {other}: not marked as {by}'s (an older version's?); delete it yourself if "
            "nothing is writing it")


# --------------------------------------------------------------------------------------------------
# Writing and replacing
# --------------------------------------------------------------------------------------------------


def _new_staging(path: Path, by: str) -> tuple[Path, str]:
    while True:
        suffix = secrets.token_hex(4)
        staging = _aside(path, STAGING, suffix)
        if not os.path.lexists(_aside(path, OLD, suffix)):
            try:
                staging.mkdir()
                break
            except FileExistsError:
                pass
    os.chmod(staging, 0o755)
    mark_created(staging, by)
    return staging, suffix


def _swap(path: Path, staging: Path, suffix: str, by: str, say: Callable[[str], None]) -> None:
    """Put the complete `staging` folder in place of `path` (see the module docstring)."""
    if not os.path.lexists(path):
        os.replace(staging, path)
        fsync_folder(path.parent)
        return
    old = _aside(path, OLD, suffix)
    old.mkdir()
    mark_created(old, by)
    os.replace(path, old / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_folder(path.parent)
    try:
        _delete_old(old, path.name)
    except OSError as e:
        say(f"could not delete the previous output {old} ({e}); the next run deletes it")


@contextlib.contextmanager
def owned_folder(path: str | os.PathLike, by: str, *, overwrite: bool = False,
                 say: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Yield an empty staging folder for the new contents of `path`; on success it replaces `path` (see the
    module docstring for the guarantees). FolderBusyError, NotReplaceableError, or the OSError of a failed write;
    on any error `path` is as it was and the staging folder is removed. `say` gets a line for each thing done
    to what dead writers left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path, by):
        _recover(path, by, say)
        check_replaceable(path, by, overwrite)
        staging, suffix = _new_staging(path, by)
        try:
            yield staging
            _write_manifest(staging, by)
            check_replaceable(path, by, overwrite)  # again: something may have been written there meanwhile
            _swap(path, staging, suffix, by, say)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
