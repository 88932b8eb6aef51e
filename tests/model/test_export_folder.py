"""common/owned_folder.py, the export's folder: a writer killed after any rename leaves, once the next writer has
recovered, the previous folder or the new one, whole, and nothing beside it; an error between the two renames
puts the previous one back; only listed files are ever replaced. Small folders, no model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.owned_folder import (
    MANIFEST_FILE,
    FolderBusyError,
    NotReplaceableError,
    foreign_entries,
    owned_folder,
)
from common.paths import MARKER_FILE

ROOT = Path(__file__).resolve().parents[2]
BY = "model.export"

# Writes {a.txt, sub/b.txt} holding argv[2] into the folder argv[1] with owned_folder, SIGKILLed right after its
# $KILL_AT-th rename (none when larger than the number of renames).
WRITER = """
import os, signal, sys
real_replace, renames = os.replace, []

def replace_then_die(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    renames.append(os.fspath(dst))
    if len(renames) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
from pathlib import Path
from common.owned_folder import owned_folder
with owned_folder(sys.argv[1], "model.export", overwrite=True) as staging:
    (staging / "sub").mkdir()
    for name in ("a.txt", "sub/b.txt"):
        (staging / name).write_text(sys.argv[2])
print(len(renames))
"""


def write(out: Path, text: str, *, kill_at: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(out), text], check=False, cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "KILL_AT": str(kill_at)}, timeout=120)


def contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def written(text: str) -> dict[str, str]:
    return {"a.txt": text, "sub/b.txt": text}


def without_records(folder: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in folder.items() if k not in (MANIFEST_FILE, MARKER_FILE)}


def test_a_writer_killed_after_any_rename_leaves_a_whole_folder(tmp_path):
    out = tmp_path / "out"
    done = write(out, "v1", kill_at=99)
    assert done.returncode == 0, done.stderr
    renames = int(done.stdout)  # the list of files, then the two of the swap (here there was no previous folder)
    assert without_records(contents(out)) == written("v1") and beside(out) == []
    for kill_at in range(1, renames + 2):
        killed = write(out, "v2", kill_at=kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr)
        said = []
        with owned_folder(out, BY, overwrite=True, say=said.append) as staging:  # recovers first
            recovered = contents(out) if out.exists() else None
            assert beside(out) == [f".{out.name}.lock", staging.name], (kill_at, said)
            (staging / "a.txt").write_text("v1")
            (staging / "sub").mkdir()
            (staging / "sub" / "b.txt").write_text("v1")
        expected = "v2" if kill_at >= 2 else "v1"  # from the first rename of the swap on, the new folder wins
        assert recovered is not None and without_records(recovered) == written(expected), (kill_at, said)
        if kill_at == 2:
            assert said == [f"a killed {BY} had moved {out} aside: its new output was complete, so the replacement is "
                            "completed (the new one is in place, the previous one deleted)"]
        elif kill_at == 1:
            assert len(said) == 1 and said[0].startswith(f"deleted {tmp_path}/.out.partial-"), said
        else:
            assert said == []  # the old folder of a finished swap goes quietly
        assert without_records(contents(out)) == written("v1") and beside(out) == []


def test_an_error_between_the_renames_puts_the_previous_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with owned_folder(out, BY) as staging:
        (staging / "a.txt").write_text("v1")
    before = contents(out)
    real_replace = os.replace

    def second_rename_fails(src, dst):
        if Path(dst) == out and ".partial-" in Path(src).name:  # the staging folder into place
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="No space"), owned_folder(out, BY, overwrite=True) as staging:
        (staging / "a.txt").write_text("v2")
    assert contents(out) == before and beside(out) == []


def test_only_a_folder_of_listed_files_is_replaced(tmp_path):
    out = tmp_path / "out"
    with owned_folder(out, BY) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("v1")
    listed = {"sub/b.txt", MARKER_FILE}
    assert foreign_entries(out, listed) == []
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "c.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")
    (out / "link").symlink_to(out / "sub" / "b.txt")
    (out / "sub" / "empty").mkdir()
    assert foreign_entries(out, listed) == ["eval/", "link", "notes.txt", "sub/c.txt", "sub/empty/"]
    before = contents(out)
    refused = r"did not write: eval/, link, notes.txt, sub/c.txt, sub/empty/; nothing was changed"
    with pytest.raises(NotReplaceableError, match=refused), owned_folder(out, BY, overwrite=True):
        pytest.fail("refused before the work")
    assert contents(out) == before and beside(out) == []


def test_what_appears_during_the_work_is_not_deleted(tmp_path):
    out = tmp_path / "out"
    with owned_folder(out, BY) as staging:
        (staging / "a.txt").write_text("v1")
    with pytest.raises(NotReplaceableError, match="did not write: results.json"), \
            owned_folder(out, BY, overwrite=True) as staging:
        (staging / "a.txt").write_text("v2")
        (out / "results.json").write_text("written meanwhile")  # evaluate.py on the previous export, say
    assert without_records(contents(out)) == {"a.txt": "v1", "results.json": "written meanwhile"}
    assert beside(out) == []


def test_one_writer_at_a_time(tmp_path):
    out = tmp_path / "out"
    with owned_folder(out, BY) as staging:
        busy = rf"another {BY} is writing {out} \(pid {os.getpid()} on "
        with pytest.raises(FolderBusyError, match=busy), owned_folder(out, BY, overwrite=True):
            pytest.fail("a second writer")
        assert staging.is_dir() and not out.exists()
        (staging / "a.txt").write_text("v1")
    assert without_records(contents(out)) == {"a.txt": "v1"} and beside(out) == []
