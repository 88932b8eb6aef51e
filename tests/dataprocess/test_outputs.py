"""process_image.py's outputs: never one of its inputs, and the training and validation files published as one
set (a run killed at any file-system step leaves the previous pair or the new pair, never one of each)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import process_image
from common import fileset
from dataprocess.pipeline import process, report_path
from settings import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, str]:
    from demo.synthetic import write_demo_raw_data

    return write_demo_raw_data(tmp_path_factory.mktemp("raw") / "raw", n_train=6, n_aic=4, n_heldout=0,
                               image_size=32, seed=0)


def make_config(root: Path, raw: dict[str, str], **data) -> Path:
    from demo.synthetic import demo_data_section

    section = {**demo_data_section(raw, "out/train.jsonl", val_size=2), **data}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"data": section}))
    return path


# --------------------------------------------------------------------------------------------------
# An output that is one of the inputs
# --------------------------------------------------------------------------------------------------


def test_an_output_that_is_an_annotations_file_is_refused_before_any_work(raw, tmp_path, capsys):
    annotations = Path(raw["llava_annotations"])
    before = annotations.read_bytes()
    (tmp_path / "link.json").symlink_to(annotations)
    relative = os.path.relpath(annotations, tmp_path)  # relative paths are taken from the config's folder
    cases = [
        ({"output": str(annotations)}, "data.output"),
        ({"output": "link.json"}, "data.output"),
        ({"val_output": relative}, "the validation output"),
    ]
    for change, label in cases:
        config = make_config(tmp_path, raw, **change)
        assert process_image.main(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {label} ") and "is the annotations file" in err, err
        assert "an output is never one of the inputs" in err
    assert annotations.read_bytes() == before and (tmp_path / "link.json").is_symlink()
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # the report beside data.output is an output too
    report_input = tmp_path / "ann.json.report.json"
    shutil.copyfile(annotations, report_input)
    sources = yaml.safe_load(make_config(tmp_path, raw).read_text())["data"]["sources"]
    sources[0]["annotations"] = str(report_input)
    config = make_config(tmp_path, raw, sources=sources, output=str(tmp_path / "ann.json"))
    assert process_image.main(["--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: the report ")


# --------------------------------------------------------------------------------------------------
# Train and validation published as one set
# --------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the kill point runs, and cleanup is switched off (see `kill_at`)."""


def pair(cfg) -> tuple[bytes | None, bytes | None]:
    files = (Path(cfg.output), Path(cfg.resolved_val_output()))
    return tuple(p.read_bytes() if p.exists() else None for p in files)


def kill_at(monkeypatch, k: int) -> dict[str, int]:
    """The k-th os.replace / os.symlink / os.link call raises Killed; deleting files does nothing, as after a
    real kill, where no cleanup runs."""
    calls = {"n": 0}
    for name in ("replace", "symlink", "link"):
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise Killed(k)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, step)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)
    return calls


def leftovers(cfg) -> list[str]:
    """What a finished run should not leave: hidden files beside the outputs other than the pointer folder,
    and in that folder anything but the pointer and the generation it points at."""
    out = Path(cfg.output).parent
    store = fileset.store_of(Path(cfg.output))
    current = os.readlink(store / fileset.POINTER)
    return [p.name for p in out.iterdir() if p.name.startswith(".") and p != store] + [
        p.name for p in store.iterdir() if p.name not in (fileset.POINTER, current)]


@pytest.mark.parametrize("layout", ["published", "plain files"])
def test_a_run_killed_at_any_step_leaves_one_runs_pair(raw, tmp_path, monkeypatch, layout):
    cfg = load_config(make_config(tmp_path, raw), sections=("data",)).data
    runs = {}
    for seed in (1, 2):
        cfg.seed = seed
        process(cfg, progress=False)
        runs[seed] = pair(cfg)
    old, new = runs[1], runs[2]
    assert old[0] != new[0] and old[1] != new[1]  # a mix of the two would be seen
    assert Path(cfg.output).is_symlink() and Path(cfg.resolved_val_output()).is_symlink()
    assert leftovers(cfg) == []

    def reset():
        cfg.seed = 1
        if layout == "published":
            process(cfg, progress=False)
        else:  # as an older version (or a user) left them: two plain files, no pointer
            for path, content in zip((cfg.output, cfg.resolved_val_output()), old):
                Path(path).unlink()
                Path(path).write_bytes(content)
            shutil.rmtree(fileset.store_of(Path(cfg.output)))
        assert pair(cfg) == old

    k, seen = 0, set()
    while True:
        k += 1
        reset()
        cfg.seed = 2
        with monkeypatch.context() as patch:
            calls = kill_at(patch, k)
            try:
                process(cfg, progress=False)
                finished = True
            except Killed:
                finished = False
        now = pair(cfg)
        assert now in (old, new), f"killed at step {k}: a pair from two runs"
        seen.add("old" if now == old else "new")
        process(cfg, progress=False)  # the next run completes and clears what the killed one left
        assert pair(cfg) == new and leftovers(cfg) == []
        if finished:
            break
    assert calls["n"] == k - 1 and k > (4 if layout == "published" else 9)
    assert seen == {"old", "new"}  # kill points both before and after the switch were hit
    report = json.loads(Path(report_path(cfg)).read_text())
    assert report["outputs"] == {"train": cfg.output, "val": cfg.resolved_val_output()}


def test_sigkill_at_the_switch_keeps_the_old_pair(raw, tmp_path):
    """A real SIGKILL in a subprocess, just before the rename that switches the pointer."""
    cfg = load_config(make_config(tmp_path, raw), sections=("data",)).data
    cfg.seed = 1
    process(cfg, progress=False)
    old = pair(cfg)
    script = (
        "import os, signal, sys\n"
        "from common import fileset\n"
        "from dataprocess.pipeline import process\n"
        "from settings import load_config\n"
        "real = os.replace\n"
        "def replace(src, dst, **kw):\n"
        "    if os.path.basename(dst) == fileset.POINTER:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst, **kw)\n"
        "os.replace = replace\n"
        "cfg = load_config(sys.argv[1], sections=('data',)).data\n"
        "cfg.seed = 2\n"
        "process(cfg, progress=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "config.yaml")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert pair(cfg) == old
    cfg.seed = 2
    process(cfg, progress=False)
    assert pair(cfg) != old and leftovers(cfg) == []
