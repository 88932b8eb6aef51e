"""train.py when things go wrong: a run killed while saving resumes from the last complete checkpoint and ends
where an uninterrupted run ends; a previous run is never replaced without consent; bad input is one line; under
DDP, activation checkpointing changes nothing and skipped samples are counted over ranks and workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tests.e2e.test_train_and_infer as train_and_infer
from tests.e2e.test_train_and_infer import ENV, ROOT, run

project = train_and_infer.project  # the module fixture: tiny models, a processed data set, a config

FAST = ["--eval_strategy", "no", "--logging_steps", "1"]

# Runs train.py with the Trainer's RNG-state save (the last file of a checkpoint before trainer_state.json)
# followed by SIGKILL at step CRASH_AT_STEP: a process killed in the middle of writing a checkpoint.
KILLED_WHILE_SAVING = """
import os, runpy, signal, sys
from transformers import Trainer

save_rng_state = Trainer._save_rng_state

def save_then_die(self, output_dir):
    save_rng_state(self, output_dir)
    if self.state.global_step == int(os.environ["CRASH_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._save_rng_state = save_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def refused(argv: list[str], capfd) -> tuple[int, str]:
    """train.py's main() in this process, for a run that must stop before training: (exit status, stderr). The
    status is the one `python train.py` exits with; in-process saves the seconds of a new interpreter's imports."""
    import train

    capfd.readouterr()
    code = train.main(argv)
    return code, capfd.readouterr().err


def weights(folder: Path) -> dict:
    return {**load_file(str(folder / "adapter_model.safetensors")), **load_file(str(folder / "projector.safetensors"))}


def assert_same_weights(a: Path, b: Path, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=atol, rtol=1e-4, msg=key)


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(project, tmp_path):
    config = ["--config", str(project / "config.yaml"), "--max_steps", "4", "--save_steps", "2", *FAST]
    full = run("train.py", *config, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    script = tmp_path / "killed_while_saving.py"
    script.write_text(KILLED_WHILE_SAVING)
    crashed = tmp_path / "crashed"
    killed = subprocess.run([sys.executable, str(script), *config, "--output_dir", str(crashed)], check=False, cwd=ROOT,
                            env={**ENV, "CRASH_AT_STEP": "4"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (crashed / "checkpoint-4" / "vlm_config.json").is_file()  # half a checkpoint: no trainer state, no record
    assert not (crashed / "checkpoint-4" / "trainer_state.json").exists()

    resumed = run("train.py", *config, "--output_dir", str(crashed), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("checkpoint-4 is incomplete (no checkpoint_complete.json: its save was interrupted): skipped"
            in resumed.stdout)
    assert "resuming from checkpoint-2, the newest complete checkpoint" in resumed.stdout
    assert_same_weights(tmp_path / "full", crashed)
    assert_same_weights(tmp_path / "full" / "checkpoint-4", crashed / "checkpoint-4")
    assert (crashed / "checkpoint-4" / "checkpoint_complete.json").is_file()


def test_a_previous_run_is_replaced_only_with_consent(project, tmp_path, capfd):
    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)
    (out / "checkpoint-9" / "vlm_config.json").write_text("{}")
    (out / "demo_eval.json").write_text('{"accuracy_with_image": 0.97}')
    (out / "eval_results.json").write_text('{"stale": true}')
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.rglob("*"))
    command = ["train.py", "--config", str(project / "config.yaml"), "--output_dir", str(out), "--max_steps", "2",
               "--save_steps", "2", "--logging_steps", "1"]

    code, err = refused(command[1:], capfd)
    assert code == 2 and "Traceback" not in err
    assert f"output_dir {out} is not empty (checkpoint-9, demo_eval.json, eval_results.json, notes.txt)" in err
    assert sorted(p.name for p in out.rglob("*")) == before

    replaced = run(*command, "--overwrite_output_dir")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert (f"--overwrite_output_dir: replacing the previous run in {out} (deleted: checkpoint-9, demo_eval.json, "
            "eval_results.json); left in place: notes.txt") in replaced.stdout
    assert not (out / "checkpoint-9").exists() and not (out / "demo_eval.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert "stale" not in (out / "eval_results.json").read_text()


def test_a_resume_refuses_settings_that_the_checkpoint_would_override(project, tmp_path, capfd):
    out = tmp_path / "out"
    command = ["train.py", "--config", str(project / "config.yaml"), "--output_dir", str(out), "--save_steps", "2",
               *FAST]
    first = run(*command, "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in out.rglob("*"))
    resume = [*command, "--max_steps", "4", "--resume_from_checkpoint", "latest"]  # a longer run: that applies

    # the config trained at 5e-3 (LoRA) and 1e-2 (projector), no weight decay, a log line every step
    code, err = refused([*resume[1:], "--learning_rate", "5e-2"], capfd)  # the LR=5e-2 (train.sh's flag)
    assert code == 2 and "Traceback" not in err
    assert (f"train.py: error: cannot resume from {out / 'checkpoint-2'} with learning_rate 0.05 (the checkpoint's: "
            "0.005): a resume restores these from the checkpoint") in err
    code, err = refused([*resume[1:], "--projector_learning_rate", "0.5", "--weight_decay", "0.1", "--logging_steps",
                         "2"], capfd)
    assert code == 2
    assert ("with projector_learning_rate 0.5 (the checkpoint's: 0.01), weight_decay 0.1 (the checkpoint's: 0), "
            "logging_steps 2 (the checkpoint's: 1):") in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing trained, nothing written


def rows(project) -> list[dict]:
    return [json.loads(line) for line in (project / "data" / "train.jsonl").read_text().splitlines()]


def write_rows(path: Path, samples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    return path


# (a wrong-typed config value: tests/settings/test_training_args.py, in-process)
@pytest.mark.parametrize("case", ["output_dir_is_a_file", "every_image_missing", "unsupported_option"])
def test_bad_training_input_is_one_line(project, tmp_path, case, capfd):
    args = ["--config", str(project / "config.yaml"), "--output_dir", str(tmp_path / "out")]
    if case == "output_dir_is_a_file":
        (tmp_path / "out").write_text("")
        expected = f"output_dir {tmp_path / 'out'} is a file, not a folder"
    elif case == "every_image_missing":
        samples = [{**s, "images": [str(tmp_path / f"gone-{n}-{k}.png") for k, _ in enumerate(s["images"])]}
                   for n, s in enumerate(rows(project))]
        args += ["--train_file", str(write_rows(tmp_path / "train.jsonl", samples))]
        expected = f"none of the {sum(len(s['images']) for s in samples)} images of {tmp_path / 'train.jsonl'} exists"
    else:
        args += ["--average_tokens_across_devices", "false"]
        expected = "average_tokens_across_devices: false is not supported"
    code, err = refused(args, capfd)
    assert code == 2, err[-3000:]
    assert f"train.py: error: {expected}" in err
    assert "Traceback" not in err and "usage:" not in err
    assert case == "output_dir_is_a_file" or not (tmp_path / "out").exists()


def test_two_process_runs_with_checkpointing_and_unreadable_images(project, tmp_path):
    """Two ranks, one DataLoader worker each, 16 samples of which 8 have a missing image (each followed by a good
    one, so every skip is a sample some rank asked for): activation checkpointing (with an option that made it
    reentrant before) gives the same weights, and the training log counts the 8 skips of all ranks and workers."""
    samples = rows(project)[:16]
    for i in range(0, 16, 2):
        gone = [str(tmp_path / f"gone-{i}-{k}.png") for k in range(len(samples[i]["images"]))]
        samples[i] = {**samples[i], "images": gone}
    train_file = write_rows(tmp_path / "train.jsonl", samples)
    outputs = {}
    checkpointing = ["--activation_checkpointing", "true",
                     "--activation_checkpointing_kwargs", '{"preserve_rng_state": true}']
    for name, port, extra in (("plain", "29541", []), ("checkpointed", "29542", checkpointing)):
        outputs[name] = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "train.py",
             "--config", str(project / "config.yaml"), "--train_file", str(train_file), "--eval_file", "",
             "--output_dir", str(outputs[name]), "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1",
             "--per_device_train_batch_size", "4", "--dataloader_num_workers", "1", *extra],
            check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(equal: True)" in result.stdout
        assert "samples skipped for unreadable images (all processes, all epochs): 8" in result.stdout
        history = json.loads((outputs[name] / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        assert [e.get("skipped_samples") for e in history if "loss" in e][-1] == 8
    assert_same_weights(outputs["plain"], outputs["checkpointed"], atol=1e-6)
