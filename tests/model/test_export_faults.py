"""model.export when things go wrong: an export killed between the two renames of an overwrite, one killed while
writing, two exports to one folder at once, a full disk, a read-only folder. Whatever happens, the output folder
holds a whole export (the previous or the new one) and the next export cleans what a dead one left."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import SafetensorError

import common.safetensors_file
from common.owned_folder import MANIFEST_FILE
from tests.model import test_export
from tests.model.test_export import beside, export, snapshot

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

base, run_dir = test_export.base, test_export.run_dir  # the module fixtures: a tiny trained run

# python -m model.export, SIGKILLed right after the rename whose destination contains $KILL_AFTER_RENAME_TO.
KILLED_AFTER_A_RENAME = """
import os, signal, sys
real_replace = os.replace

def replace_then_die(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if os.environ["KILL_AFTER_RENAME_TO"] in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
from model.export import main
sys.exit(main(sys.argv[1:]))
"""

# python -m model.export that stops once its weights are written, until a line comes on stdin.
PAUSED_AFTER_THE_WEIGHTS = """
import sys
import qwen.checkpoint
save_sharded_safetensors = qwen.checkpoint.save_sharded_safetensors

def save_then_wait(*args, **kwargs):
    names = save_sharded_safetensors(*args, **kwargs)
    print("weights written", flush=True)
    sys.stdin.readline()
    return names

qwen.checkpoint.save_sharded_safetensors = save_then_wait
from model.export import main
sys.exit(main(sys.argv[1:]))
"""


def python(script: str, *args) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("export: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("export: error: "), err
    return lines[0]


def test_an_overwrite_killed_between_its_two_renames_is_completed_or_rolled_back(run_dir, tmp_path, capsys):
    out = tmp_path / "runs" / "exported"
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--dtype", "fp16") == 0
    previous = snapshot(out)
    assert export("--checkpoint", run_dir, "--output", tmp_path / "exported", "--no-copy-vision") == 0
    new = snapshot(tmp_path / "exported")  # what the killed export writes
    killed = subprocess.run(python(KILLED_AFTER_A_RENAME, "--checkpoint", run_dir, "--output", out, "--no-copy-vision",
                                   "--overwrite"),
                            check=False, cwd=ROOT, env={**ENV, "KILL_AFTER_RENAME_TO": f".{out.name}.old-"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not out.exists()  # the previous export moved aside, the new one not yet in place
    staging = [name for name in beside(out) if ".partial-" in name]
    assert len(staging) == 1 and snapshot(out.parent / staging[0]) == new
    had_it_not_been_complete = tmp_path / "copy"
    shutil.copytree(out.parent, had_it_not_been_complete, symlinks=True)

    # the next export (here without --overwrite, so that it stops once the folder is whole) finishes the swap
    capsys.readouterr()
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision") == 2
    err = capsys.readouterr().err
    assert "the replacement is completed (the new one is in place, the previous one deleted)" in err, err
    assert "exists and is not empty" in err and snapshot(out) == new and beside(out) == []

    # a staging folder without its list of files (not complete) is never put in place: the previous comes back
    copy = had_it_not_been_complete / out.name
    (had_it_not_been_complete / staging[0] / MANIFEST_FILE).unlink()
    assert export("--checkpoint", run_dir, "--output", copy, "--no-copy-vision") == 2
    err = capsys.readouterr().err
    assert "before its new output was complete: the previous one is restored" in err, err
    assert snapshot(copy) == previous and beside(copy) == []


def test_a_live_exports_folder_is_left_alone_and_a_dead_ones_staging_deleted(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    writer = subprocess.Popen(python(PAUSED_AFTER_THE_WEIGHTS, "--checkpoint", run_dir, "--output", out,
                                     "--no-copy-vision"),
                              cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert writer.stdout.readline() == "weights written\n"
        [staging] = [out.parent / name for name in beside(out) if ".partial-" in name]
        staged = snapshot(staging)
        assert any(name.endswith(".safetensors") for name in staged)
        capsys.readouterr()
        assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--overwrite") == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"another model.export is writing {out} (pid {writer.pid} on " in line, line
        assert snapshot(staging) == staged and not out.exists()
    finally:
        writer.kill()
        writer.wait()
    assert snapshot(staging) == staged  # what a killed export leaves: its staging folder, weights and all

    capsys.readouterr()
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision") == 0
    err = capsys.readouterr().err
    assert f"export: deleted {staging}, left by a killed model.export (" in err, err
    assert beside(out) == [] and (out / MANIFEST_FILE).is_file()


def test_an_older_versions_staging_folder_is_named_and_left_alone(run_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    unmarked = tmp_path / f".{out.name}.partial-k2_x9q1z"  # mkdtemp's name, no marker
    unmarked.mkdir()
    (unmarked / "model.safetensors").write_bytes(b"...")
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision") == 0
    err = capsys.readouterr().err
    assert f"export: left alone {unmarked}: not marked as model.export's" in err, err
    assert (unmarked / "model.safetensors").read_bytes() == b"..."


def test_a_full_disk_is_one_message_and_the_previous_export_stays(run_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error; here the second shard fails after writing part of it."""
    out = tmp_path / "exported"
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision") == 0
    previous = snapshot(out)
    save_file, calls = common.safetensors_file.save_file, []

    def disk_full_on_the_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(common.safetensors_file, "save_file", disk_full_on_the_second_file)
    capsys.readouterr()
    assert export("--checkpoint", run_dir, "--output", out, "--no-copy-vision", "--overwrite",
                  "--max-shard-gb", "0.00001") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device: " in line and f"nothing was exported, {out} is as it was" in line, line
    assert len(calls) == 2 and snapshot(out) == previous and beside(out) == []


def test_a_read_only_folder_is_one_message_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: creating anything in the folder fails with EROFS, as it does there)."""
    parent = tmp_path / "readonly"
    parent.mkdir()
    out = parent / "exported"
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return Path(os.path.abspath(path)).parent == parent

    def read_only_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    monkeypatch.setattr("model.bundle.load_vlm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert export("--checkpoint", run_dir, "--output", out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "Read-only file system: " in line and f"{out} is as it was" in line, line
    assert list(parent.iterdir()) == []
