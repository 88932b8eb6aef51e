"""demo.prepare deletes only a workdir it created: never the checkout, a folder holding the config it reads, or
someone else's files. The preparation itself is stopped at its first step (a sentinel), after the deletion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from common.paths import MARKER_FILE, mark_created
from demo import prepare as prepare_module
from settings import DemoConfig

CHECKOUT = Path(__file__).resolve().parents[2]


class FirstStepError(Exception):
    """Raised by the first building step: everything before it (the checks, the deletion) has run."""


@pytest.fixture(autouse=True)
def stop_at_first_step(monkeypatch, tmp_path):
    def first_step(*args, **kwargs):
        raise FirstStepError()

    monkeypatch.setattr("visual.tiny_clip.write_tiny_clip_checkpoint", first_step)  # what prepare() imports
    # A safety net for this test itself: whatever the code under test does, nothing outside tmp_path is deleted.
    real_rmtree = shutil.rmtree

    def guarded_rmtree(path, *args, **kwargs):
        if tmp_path.resolve() not in Path(path).resolve().parents:
            raise AssertionError(f"demo.prepare tried to delete {path}")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", guarded_rmtree)


def write_config(tmp_path: Path, workdir: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"demo": {"workdir": workdir}}))
    return path


def test_the_checkout_and_the_config_folder_are_refused(tmp_path, capsys):
    before = sorted(p.name for p in CHECKOUT.iterdir())
    for workdir, message in ((str(CHECKOUT), "is or contains the checkout"),
                             (str(CHECKOUT.parent), "is or contains the checkout"),
                             (".", "is or contains the config file")):  # relative: the config's own folder
        assert prepare_module.main(["--config", str(write_config(tmp_path, workdir))]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("demo.prepare: error: demo.workdir ") and message in err, err
    assert sorted(p.name for p in CHECKOUT.iterdir()) == before
    assert (tmp_path / "config.yaml").is_file()


def test_a_folder_of_someone_else_is_left_alone(tmp_path, capsys):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    assert prepare_module.main(["--config", str(write_config(tmp_path, "mine"))]) == 2
    assert "holds files that demo.prepare did not write" in capsys.readouterr().err
    assert (work / "thesis.tex").read_text() == "years of work"
    with pytest.raises(prepare_module.WorkdirError):
        prepare_module.prepare(DemoConfig(workdir=str(work)), force=True)
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("how", ["marker", "stamp of an earlier version", "empty", "new"])
def test_a_workdir_of_ours_is_replaced(tmp_path, how):
    work = tmp_path / "demo-work"
    if how != "new":
        work.mkdir()
    if how == "marker":
        mark_created(work, "demo.prepare")
        (work / "tiny-clip").mkdir()
    elif how == "stamp of an earlier version":
        (work / "prepared.json").write_text(json.dumps({"workdir": str(work), "seed": 5}))
        (work / "raw").mkdir()
    with pytest.raises(FirstStepError):
        prepare_module.prepare(DemoConfig(workdir=str(work)), inputs=(tmp_path / "config.yaml",))
    assert sorted(p.name for p in work.iterdir()) == [MARKER_FILE]  # emptied, then marked as ours
