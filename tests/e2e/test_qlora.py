"""QLoRA end to end on tiny models (`--quantization nf4`): training lowers the loss as in full precision, resumes
exactly, writes bundles that say nf4 and hold an adapter of the same tensors as a full-precision one; infer.py
answers with the 4-bit base again unless told otherwise; both exports fold the adapter into the original weights
and load without bitsandbytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.e2e.test_train_and_infer import ENV, ROOT, run
from tests.e2e.test_train_sh_stages import run_train_sh
from tests.projects import write_test_project

STEPS = 8


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_clip_dir):
    """A tiny QWen whose widths are multiples of 64 (bitsandbytes' CPU kernel needs them), a small processed data
    set, a config."""
    from qwen.tiny import write_tiny_qwen_checkpoint

    root = tmp_path_factory.mktemp("qlora")
    llm = write_tiny_qwen_checkpoint(root / "tiny-qwen", seed=3, bias_std=0.02, hidden_size=64, intermediate_size=256)
    return write_test_project(root, llm, tiny_clip_dir, training={
        "output_dir": str(root / "out"), "seed": 3, "max_steps": STEPS, "per_device_train_batch_size": 4,
        "learning_rate": 5.0e-3, "projector_learning_rate": 1.0e-2, "save_steps": 4, "logging_steps": 1,
        "report_to": "none", "train_sampling_strategy": "group_by_length", "warmup_steps": 0,
        "lr_scheduler_type": "constant", "disable_tqdm": True, "eval_strategy": "no",
    })


@pytest.fixture(scope="module")
def runs(project):
    """{name: output folder}: full precision, nf4, and nf4 resumed from nf4's checkpoint-4."""
    config = ["--config", str(project / "config.yaml")]
    for name, extra in (("full", []), ("nf4", ["--quantization", "nf4"]),
                        ("resumed", ["--quantization", "nf4", "--resume_from_checkpoint",
                                     str(project / "nf4" / "checkpoint-4")])):
        result = run("train.py", *config, "--output_dir", str(project / name), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: project / name for name in ("full", "nf4", "resumed")}


def losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def tensors(folder: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder."""
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}


def test_qlora_lowers_the_loss_like_full_precision(runs):
    """Same batches in the same order: the 4-bit run's loss falls by about as much as the full-precision one's
    (measured: both by 0.19 from the first three steps to the last three, from 11.95)."""
    full, nf4 = losses(runs["full"]), losses(runs["nf4"])
    assert sorted(full) == sorted(nf4) == list(range(1, STEPS + 1))

    def drop(history: dict[int, float]) -> float:
        return (sum(history[s] for s in (1, 2, 3)) - sum(history[s] for s in range(STEPS - 2, STEPS + 1))) / 3

    assert drop(full) > 0.1, full  # (the run learns: a drop to compare with)
    assert abs(drop(nf4) - drop(full)) < 0.25 * drop(full), (full, nf4)
    assert full[1] != nf4[1]  # (the base really was quantised: the LoRA starts at zero, the losses differ)


def test_qlora_bundles_say_nf4_and_hold_the_same_adapter_tensors(runs):
    for folder in (runs["nf4"], runs["nf4"] / "checkpoint-4"):
        assert json.loads((folder / "vlm_config.json").read_text())["text"]["quantization"] == "nf4"
    assert json.loads((runs["full"] / "vlm_config.json").read_text())["text"]["quantization"] == "none"
    full, nf4 = tensors(runs["full"]), tensors(runs["nf4"])
    assert {k: v.shape for k, v in nf4.items()} == {k: v.shape for k, v in full.items()}
    assert {v.dtype for v in nf4.values()} == {v.dtype for v in full.values()} == {torch.float32}
    assert sorted(json.loads((runs["nf4"] / "adapter_config.json").read_text())["target_modules"]) == \
        sorted(json.loads((runs["full"] / "adapter_config.json").read_text())["target_modules"])


def test_a_qlora_resume_ends_where_the_uninterrupted_run_ends(runs):
    a, b = losses(runs["nf4"]), losses(runs["resumed"])
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert abs(a[step] - b[step]) < 1e-3, (step, a, b)
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        ta, tb = tensors(runs["nf4"], name), tensors(runs["resumed"], name)
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], atol=1e-5, rtol=1e-4, msg=key)


def test_resuming_a_qlora_checkpoint_in_full_precision_is_refused(project, runs):
    result = run("train.py", "--config", str(project / "config.yaml"), "--output_dir", str(project / "other"),
                 "--resume_from_checkpoint", str(runs["nf4"] / "checkpoint-4"))
    assert result.returncode == 2 and "text.quantization: checkpoint 'nf4' vs now 'none'" in result.stderr
    assert not (project / "other").exists()


def test_an_unknown_quantization_in_the_config_is_one_line(project, tmp_path):
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"]["quantization"] = "int4"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run("train.py", "--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "model.quantization: 'int4' is not one of: none, nf4" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_sh_passes_quantization_to_training_and_the_demo_evaluation(tmp_path):
    code, calls, _ = run_train_sh(tmp_path, {"demo": {}, "training": {"output_dir": "out"}},
                                  env={"QUANTIZATION": "nf4"})
    assert code == 0
    assert calls[-2:] == ["train.py --config C --overwrite_output_dir --quantization nf4",
                          "-m demo.evaluate --config C --quantization nf4"]


def test_infer_answers_with_the_4bit_base_unless_told_otherwise(project, runs):
    """infer.py on a QLoRA bundle answers what the 4-bit model with its unmerged adapter generates; with
    --quantization none, what the adapter merged into the original weights generates."""
    from inference import Prompt, generate_answers
    from llm import load_tokenizer
    from llm.quantization import quantization_of
    from model import load_vlm
    from visual import load_image, load_image_preprocessor

    bundle = runs["nf4"]
    image = next((project / "raw" / "heldout_images").iterdir())
    prompt = [Prompt("<image>\nWhat colour is the shape?", [load_image(image)])]
    for flags, quantization, adapter in (([], "nf4", True), (["--quantization", "none"], "none", False)):
        model, config = load_vlm(bundle, **({"quantization": flags[1]} if flags else {}))
        assert quantization_of(model.language_model) == quantization and model.has_adapter == adapter
        llm_path, vision_path = config.resolve(bundle)
        expected = generate_answers(model.eval(), load_tokenizer(llm_path), load_image_preprocessor(vision_path),
                                    prompt, system=config.system_prompt,
                                    num_image_tokens=config.vision.num_image_tokens, max_new_tokens=6)[0]
        answer = run("infer.py", "--checkpoint", str(bundle), "--image", str(image), "--prompt",
                     "What colour is the shape?", "--max-new-tokens", "6", *flags)
        assert answer.returncode == 0, answer.stderr[-2000:]
        assert answer.stdout == expected + "\n", flags
    wrong = run("infer.py", "--checkpoint", str(bundle), "--image", str(image), "--prompt", "x", "--quantization",
                "int4")
    assert wrong.returncode == 2 and "quantization: 'int4' is not one of: none, nf4" in wrong.stderr


LOAD_WITHOUT_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None  # not installed, as far as this process can tell
import json, torch
from qwen import QWenLMHeadModel
from transformers import LlavaForConditionalGeneration
qwen = QWenLMHeadModel.from_pretrained(sys.argv[1])
llava = LlavaForConditionalGeneration.from_pretrained(sys.argv[2])
ids = torch.tensor([[1, 2, 3, 4, 5]])
print(json.dumps({"qwen": qwen(ids).logits.tolist(),
                  "llava": llava.model.language_model(ids).last_hidden_state.shape[-1],
                  "linear": sorted({type(m).__name__ for m in qwen.modules() if isinstance(m, torch.nn.Linear)})}))
"""


def test_both_exports_fold_the_adapter_into_the_original_weights_and_load_without_bitsandbytes(project, runs):
    import bitsandbytes.functional as bnb_functional

    from model import load_vlm

    bundle, qwen_out, llava_out = runs["nf4"], project / "export-qwen", project / "export-llava"
    for fmt, out in (("qwen", qwen_out), ("llava", llava_out)):
        result = run("-m", "model.export", "--checkpoint", str(bundle), "--output", str(out), "--format", fmt)
        assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((qwen_out / "vlm_config.json").read_text())["text"]["quantization"] == "none"
    assert "quantization_config" not in (llava_out / "config.json").read_text()
    assert "Trained as QLoRA: the LLM's linear weights were held in 4-bit NF4" in (llava_out / "README.md").read_text()

    # c_attn of layer 0, by hand: the base folder's weight + (alpha / r) * B @ A, not the 4-bit weight's values
    base = weights(project / "tiny-qwen")["transformer.h.0.attn.c_attn.weight"]
    adapter = tensors(bundle)
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    delta = 2.0 * adapter[prefix + "lora_B.weight"] @ adapter[prefix + "lora_A.weight"]
    exported = weights(qwen_out)["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(exported, base + delta, atol=1e-6, rtol=1e-5)
    four_bit, _ = load_vlm(bundle, merge_lora=False)
    layer = four_bit.llm.transformer.h[0].attn.c_attn.base_layer
    dequantised = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert (exported - (dequantised + delta)).abs().max() > 1e-3  # the two merges are distinguishable here
    llava = weights(llava_out)
    torch.testing.assert_close(llava["language_model.model.layers.0.self_attn.q_proj.weight"], exported[:64])

    shown = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_BITSANDBYTES, str(qwen_out), str(llava_out)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert shown.returncode == 0, shown.stderr[-3000:]
    loaded = json.loads(shown.stdout.strip().splitlines()[-1])
    assert loaded["linear"] == ["Linear"] and loaded["llava"] == 64
    merged, _ = load_vlm(qwen_out)  # our loader: the merged export is a full-precision model
    with torch.no_grad():
        ours = merged.llm(torch.tensor([[1, 2, 3, 4, 5]])).logits
    torch.testing.assert_close(torch.tensor(loaded["qwen"]), ours, atol=1e-5, rtol=1e-5)


def test_both_stages_train_on_the_4bit_base(project, tmp_path):
    """The align stage (projector only, the 4-bit LLM frozen), then the instruct stage from its projector."""
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"]["quantization"] = "nf4"
    config["training"].update(output_dir=str(tmp_path / "instruct"), max_steps=2, save_steps=2)
    config["align"] = {"output_dir": str(tmp_path / "align"), "sources": ["aic"], "max_steps": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    align = run("train.py", "--config", str(tmp_path / "c.yaml"), "--stage", "align")
    assert align.returncode == 0, align.stderr[-3000:]
    assert "align stage: only the projector trains" in align.stdout
    instruct = run("train.py", "--config", str(tmp_path / "c.yaml"))
    assert instruct.returncode == 0, instruct.stderr[-3000:]
    assert f"projector loaded from {tmp_path / 'align' / 'projector.safetensors'}" in instruct.stdout
    for stage, adapter in (("align", False), ("instruct", True)):
        saved = json.loads((tmp_path / stage / "vlm_config.json").read_text())
        assert saved["text"]["quantization"] == "nf4" and saved["adapter"] == adapter, stage
    before, after = (tensors(tmp_path / stage, "projector.safetensors") for stage in ("align", "instruct"))
    assert not torch.equal(before["linear_2.weight"], after["linear_2.weight"])  # (the instruct stage trained it)
