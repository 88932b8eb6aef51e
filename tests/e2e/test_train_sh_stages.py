"""train.sh's stage logic, with a stand-in for python that records each command instead of running it: the align
stage first when the config has an align section, STAGE picking one, flags going to every stage, resuming only one
stage, the demo's flags to both stages and its evaluation after the instruct stage only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_train_sh(tmp_path, config: dict, *args, stage: str | None = None, env: dict | None = None):
    """(exit status, the python commands train.sh ran, stderr)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    fake = tmp_path / "fake-python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ("STAGE", "LR", "PROJECTOR_LR")}
    environment.update({"PYTHON": str(fake), "NPROC": "1", "CONFIG": str(path), **(env or {})})
    if stage is not None:
        environment["STAGE"] = stage
    result = subprocess.run(["bash", str(ROOT / "train.sh"), *args], env=environment, capture_output=True,
                            text=True, timeout=60, check=False)
    calls = log.read_text().splitlines() if log.is_file() else []
    return result.returncode, [c.replace(str(path), "C") for c in calls], result.stderr


REAL = {"training": {"output_dir": "out"}, "align": {"output_dir": "out-align"}}
SINGLE = {"training": {"output_dir": "out"}}
DEMO = {"demo": {}, **REAL}


def test_two_stages_in_order_flags_to_both(tmp_path):
    code, calls, _ = run_train_sh(tmp_path, REAL, "--seed", "1", env={"PROJECTOR_LR": "1e-4"})
    assert code == 0
    assert calls == ["train.py --config C --stage align --projector_learning_rate 1e-4 --seed 1",
                     "train.py --config C --projector_learning_rate 1e-4 --seed 1"]


def test_a_config_without_align_runs_one_stage(tmp_path):
    code, calls, _ = run_train_sh(tmp_path, SINGLE, "--seed", "1")
    assert code == 0 and calls == ["train.py --config C --seed 1"]


@pytest.mark.parametrize("stage,expected", [
    ("align", ["train.py --config C --stage align --resume_from_checkpoint latest"]),
    ("instruct", ["train.py --config C --resume_from_checkpoint latest"]),
])
def test_stage_runs_one_stage_and_resumes_it(tmp_path, stage, expected):
    code, calls, _ = run_train_sh(tmp_path, REAL, "--resume_from_checkpoint", "latest", stage=stage)
    assert code == 0 and calls == expected


@pytest.mark.parametrize("args,stage,message", [
    (["--resume_from_checkpoint", "latest"], None, "has two stages and a checkpoint resumes one: STAGE=align or "
                                                   "STAGE=instruct bash train.sh --resume_from_checkpoint latest"),
    (["--stage", "align"], None, "choose the stage with STAGE=align or STAGE=instruct, not --stage"),
    ([], "pretrain", "STAGE must be align or instruct"),
])
def test_mistakes_are_refused_before_anything_runs(tmp_path, args, stage, message):
    code, calls, err = run_train_sh(tmp_path, REAL, *args, stage=stage)
    assert code == 2 and calls == [] and message in err


def test_the_demo_replaces_both_stages_and_evaluates_after_instruct(tmp_path):
    code, calls, _ = run_train_sh(tmp_path, DEMO)
    assert code == 0
    assert calls == ["-m demo.prepare --config C", "process_image.py --config C",
                     "train.py --config C --stage align --overwrite_output_dir",
                     "train.py --config C --overwrite_output_dir", "-m demo.evaluate --config C"]
    code, calls, _ = run_train_sh(tmp_path, DEMO, stage="align")
    assert code == 0 and calls[-1] == "train.py --config C --stage align --overwrite_output_dir"  # no evaluation


def test_a_failing_align_stage_stops_train_sh(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(REAL))
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake-python"  # records the command, and fails the align stage
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\ncase "$*" in *"--stage align"*) exit 2 ;; esac\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "STAGE"}
    result = subprocess.run(["bash", str(ROOT / "train.sh")], env={**env, "PYTHON": str(fake), "NPROC": "1",
                                                                  "CONFIG": str(path)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert log.read_text().splitlines() == [f"train.py --config {path} --stage align"]  # instruct never started


def test_the_demo_caches_the_tower_features_when_its_config_sets_a_feature_cache(tmp_path):
    """config.yaml sets data.feature_cache: process_image.py then computes the frozen tower's features once per
    image, and train.py reads them instead of running the tower every epoch."""
    config = {"demo": {}, "data": {"feature_cache": "features"}, **SINGLE}
    code, calls, _ = run_train_sh(tmp_path, config)
    assert code == 0 and calls[:2] == ["-m demo.prepare --config C", "process_image.py --config C --cache-features"]
    assert "feature_cache:" in (ROOT / "config.yaml").read_text()  # the demo as committed
