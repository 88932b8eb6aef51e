"""train.py and infer.py end to end on tiny models: optimizer groups, checkpoints, exact resume, bad input, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.projects import write_test_project

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*args, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llm_dir, tiny_clip_dir):
    """Tiny models, a small synthetic raw set processed by process_image.py, and a config using them."""
    root = tmp_path_factory.mktemp("project")
    return write_test_project(root, tiny_llm_dir, tiny_clip_dir, training={
        "output_dir": str(root / "out"), "seed": 3, "max_steps": 6, "per_device_train_batch_size": 4,
        "learning_rate": 5.0e-3, "projector_learning_rate": 1.0e-2, "save_steps": 3, "logging_steps": 1,
        "report_to": "none", "train_sampling_strategy": "group_by_length", "warmup_steps": 0,
        "lr_scheduler_type": "linear", "disable_tqdm": True,
    })


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_train_saves_bundles_resumes_exactly_and_infer_loads_a_checkpoint(project):
    config = project / "config.yaml"
    full = run("train.py", "--config", str(config), "--output_dir", str(project / "a"))
    assert full.returncode == 0, full.stderr[-3000:]
    for folder in (project / "a" / "checkpoint-3", project / "a" / "checkpoint-6", project / "a"):
        assert {"vlm_config.json", "projector.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= {
            p.name for p in folder.iterdir()}, folder

    resumed = run("train.py", "--config", str(config), "--output_dir", str(project / "b"),
                  "--resume_from_checkpoint", str(project / "a" / "checkpoint-3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    histories = {
        run_dir: {e["step"]: e["loss"] for e in json.loads(
            (project / run_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"] if "loss" in e}
        for run_dir in ("a", "b")
    }
    # b carries a's history of steps 1-3 and then trained steps 4-6 itself: the same losses as the uninterrupted run
    assert sorted(histories["b"]) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(histories["a"][step] - histories["b"][step]) < 1e-3, step
    assert "Resuming from" in resumed.stdout and "at step 3" in resumed.stdout
    a, b = adapter(project / "a"), adapter(project / "b")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(load_file(str(project / "b" / "projector.safetensors"))["linear_2.weight"],
                               load_file(str(project / "a" / "projector.safetensors"))["linear_2.weight"],
                               atol=1e-5, rtol=1e-4)
    assert (project / "a" / "eval_results.json").is_file()

    # infer.py answers from a mid-run checkpoint exactly what the loaded bundle generates in-process
    from inference import Prompt, generate_answers
    from model import load_vlm
    from qwen import QWenTokenizer
    from visual import ImagePreprocessor, load_image

    image = next((project / "raw" / "heldout_images").iterdir())
    answer = run("infer.py", "--checkpoint", str(project / "a" / "checkpoint-3"), "--image", str(image),
                 "--prompt", "What colour is the shape?", "--max-new-tokens", "6")
    assert answer.returncode == 0, answer.stderr[-2000:]
    model, cfg = load_vlm(project / "a" / "checkpoint-3")
    llm_path, vision_path = cfg.resolve(project / "a" / "checkpoint-3")
    expected = generate_answers(
        model.eval(), QWenTokenizer.from_pretrained(llm_path), ImagePreprocessor.from_pretrained(vision_path),
        [Prompt("<image>\nWhat colour is the shape?", [load_image(image)])], system=cfg.system_prompt,
        num_image_tokens=cfg.vision.num_image_tokens, max_new_tokens=6,
    )[0]
    assert answer.stdout == expected + "\n"

    # resuming with another LoRA shape is refused before anything runs
    other = run("train.py", "--config", str(config), "--output_dir", str(project / "c"), "--lora_r", "8",
                "--resume_from_checkpoint", str(project / "a" / "checkpoint-3"))
    assert other.returncode == 2 and "LoRA r: checkpoint 4 vs now 8" in other.stderr
    assert not (project / "c").exists()


def test_gradient_accumulation_weighs_every_token_the_same(project):
    """One SGD step on 4 samples: batch 4 at once, or 2 x 2 with gradient accumulation, lands on the same weights
    (the micro-batches hold different numbers of supervised tokens)."""
    common = ["--config", str(project / "config.yaml"), "--max_steps", "1", "--optim", "sgd", "--max_grad_norm", "0",
              "--train_sampling_strategy", "random", "--learning_rate", "0.5", "--projector_learning_rate", "0.5",
              "--eval_strategy", "no"]
    for name, batch, accumulation in (("ga1", "4", "1"), ("ga2", "2", "2")):
        result = run("train.py", *common, "--output_dir", str(project / name), "--per_device_train_batch_size", batch,
                     "--gradient_accumulation_steps", accumulation)
        assert result.returncode == 0, result.stderr[-3000:]
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        one, two = load_file(str(project / "ga1" / file)), load_file(str(project / "ga2" / file))
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-4, msg=key)


def test_load_best_model_at_end_restores_adapter_and_projector(project):
    out = project / "best"
    result = run("train.py", "--config", str(project / "config.yaml"), "--output_dir", str(out), "--max_steps", "3",
                 "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
                 "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                 "--greater_is_better", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    best = Path(json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["best_model_checkpoint"])
    assert best.name != "checkpoint-3"  # the highest eval loss is an early one: the test is not vacuous
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        final, chosen = load_file(str(out / file)), load_file(str(out / best.name / file))
        for key in final:
            torch.testing.assert_close(final[key], chosen[key], atol=0, rtol=0, msg=f"{file}:{key}")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model": {"llm_path": "/nowhere/qwen"}}, "model.llm_path: folder not found: /nowhere/qwen"),
        ({"data": {"output": "/nowhere/train.jsonl"}}, "processed training data not found: /nowhere/train.jsonl"),
        ({"training": {"learning_rat": 1.0}}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"lora": {"lora_target_modules": ["c_atn", "w1"]}}, "LoRA target(s) ['c_atn'] match no module"),
    ],
)
def test_bad_input_is_one_clear_message_and_writes_nothing(project, tmp_path, change, message):
    config = yaml.safe_load((project / "config.yaml").read_text())
    for section, values in change.items():
        config[section].update(values)
    config["training"]["output_dir"] = str(tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run("train.py", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_two_process_run_ends_with_equal_weights(project):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "train.py", "--config", str(project / "config.yaml"), "--output_dir", str(project / "ddp"),
         "--max_steps", "2", "--save_steps", "100"],
        check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(equal: True)" in result.stdout
