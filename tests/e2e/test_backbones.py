"""Every user command on a tiny Qwen2.5 + SigLIP pair built in the published layouts (tests/conftest.py), and one
processed data set trained on two different LLMs without reprocessing.

The training project is processed once (with the SigLIP feature cache) for the module; train.py runs in this
process, as in tests/training/test_stages.py, whose helpers it reuses. The generation commands run on the
conftest's Qwen2.5 + SigLIP bundle, whose random LoRA and projector make answers that depend on the image and the
whole prompt: each command must give what the shared generation code (`inference.load_checkpoint`) gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from dataprocess import features
from inference import Prompt, Turn, chat_prompt, load_checkpoint, query_with_images
from tests.projects import write_test_project
from tests.training.test_stages import FAST, SAVE_EACH_STEP, Recorder, projector_of
from visual import load_image

QUESTION = "What colour is the shape?"


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_qwen2_dir, tiny_siglip_dir):
    """A small synthetic set processed once by `process_image.py --cache-features` (SigLIP features), and a
    config with both stages on Qwen2.5 + SigLIP: align on the captions, instruct from the align run's projector.
    Also the digest of everything processing wrote, taken right after it."""
    root = tmp_path_factory.mktemp("backbones")
    with pytest.MonkeyPatch.context() as mp:  # the cache in fp32 on the CPU on every machine (compared below)
        mp.setattr(features, "default_device", lambda: (torch.device("cpu"), torch.float32))
        write_test_project(
            root, tiny_qwen2_dir, tiny_siglip_dir, n_train=6, n_aic=6, seed=4, cache_features=True,
            model={"projector_path": "out/align"},
            training={"output_dir": "out/instruct", "seed": 3, "max_steps": 2, "per_device_train_batch_size": 4,
                      "learning_rate": 5.0e-3, "projector_learning_rate": 1.0e-2, "warmup_steps": 0,
                      "logging_steps": 1},
            align={"output_dir": "out/align", "projector_learning_rate": 5.0e-2, "max_steps": 1, "sources": ["aic"]},
        )
    manifest = json.loads((root / "data" / "features" / "manifest.json").read_text())
    assert manifest["vision_path"] == str(Path(tiny_siglip_dir).resolve()) and manifest["num_patches"] == 16
    return {"root": root, "config": root / "config.yaml", "processed": tree_digest(root / "data")}


@pytest.fixture(scope="module")
def stages(project):
    """The align stage, then the instruct stage from its projector, saving every step; the instruct run's model
    before its first step."""
    rec = Recorder()
    config = str(project["config"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "VLMTrainer", rec.trainer)
        assert train.main(["--config", config, "--stage", "align", *FAST]) == 0
        assert train.main(["--config", config, *SAVE_EACH_STEP]) == 0
    return {"align": project["root"] / "out" / "align", "instruct": project["root"] / "out" / "instruct",
            "start": rec.runs[1]["start"], "model": rec.runs[1]["model"]}


def test_the_feature_cache_holds_the_siglip_towers_features(project, tiny_siglip_dir):
    from visual import load_image_preprocessor, load_vision_tower

    cache = features.FeatureCache(project["root"] / "data" / "features")
    paths = features.images_of_jsonl([project["root"] / "data" / "train.jsonl"])[:3]
    pixels = load_image_preprocessor(tiny_siglip_dir)([load_image(p) for p in paths])
    with torch.no_grad():
        expected, last = (load_vision_tower(tiny_siglip_dir, feature_layer=layer)(pixels) for layer in (-2, -1))
    assert expected.shape == (3, 16, 32)  # SigLIP: every patch of the 56 px image is a feature, no CLS
    # (fp32 CPU matmuls round differently for another number of images per call: ~1e-7 relative)
    torch.testing.assert_close(cache(paths), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cache(paths), last, atol=1e-3)  # the configured layer's, not any layer's


def test_both_stages_train_qwen2_siglip_and_the_instruct_stage_starts_from_the_align_projector(stages):
    align = json.loads((stages["align"] / "vlm_config.json").read_text())
    assert (align["text"]["family"], align["vision"]["family"], align["image_token"]) == ("qwen2", "siglip",
                                                                                         "<|image_pad|>")
    assert not align["adapter"] and not (stages["align"] / "adapter_model.safetensors").exists()
    aligned = load_file(str(stages["align"] / "projector.safetensors"))
    start = projector_of(stages["start"])
    assert set(start) == set(aligned)
    for key, value in aligned.items():
        assert torch.equal(start[key], value), key
    model = stages["model"]
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
               if p.requires_grad and "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    final = load_file(str(stages["instruct"] / "projector.safetensors"))
    assert not torch.equal(final["linear_1.weight"], aligned["linear_1.weight"])  # and it kept training


def losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "checkpoint-2" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_resume_latest_equals_the_uninterrupted_run(project, stages, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(stages["instruct"] / "checkpoint-1", resumed / "checkpoint-1")
    capsys.readouterr()
    assert train.main(["--config", str(project["config"]), "--output_dir", str(resumed), "--resume_from_checkpoint",
                       "latest", *SAVE_EACH_STEP]) == 0
    assert f"Resuming from {resumed / 'checkpoint-1'} at step 1" in capsys.readouterr().out
    assert sorted(losses(resumed)) == [1, 2]
    assert abs(losses(resumed)[2] - losses(stages["instruct"])[2]) < 1e-4
    for file in ("adapter_model.safetensors", "projector.safetensors"):
        full, again = load_file(str(stages["instruct"] / file)), load_file(str(resumed / file))
        assert set(full) == set(again)
        for key in full:
            torch.testing.assert_close(again[key], full[key], atol=1e-6, rtol=1e-5, msg=f"{file}:{key}")


def test_data_processed_once_trains_another_llm_without_reprocessing(project, stages, tiny_llm_dir, tmp_path):
    """The same processed files and feature cache train QWen v1 (+ the same SigLIP tower): nothing is rewritten,
    and each LLM's bundle puts its own image token in and answers."""
    other = tmp_path / "qwen1"
    assert train.main(["--config", str(project["config"]), "--llm_path", str(tiny_llm_dir), "--projector_path", "",
                       "--output_dir", str(other), "--max_steps", "1", *FAST]) == 0
    assert tree_digest(project["root"] / "data") == project["processed"]  # not one byte of the data changed
    text = (project["root"] / "data" / "train.jsonl").read_text()
    assert "<image>" in text and "<|extra_0|>" not in text and "<|image_pad|>" not in text

    image = load_image(next((project["root"] / "raw" / "heldout_images").iterdir()))
    for bundle, family, token in ((other, "qwen", "<|extra_0|>"), (stages["instruct"], "qwen2", "<|image_pad|>")):
        loaded = load_checkpoint(bundle, device="cpu")
        assert (loaded.config.text.family, loaded.config.image_token) == (family, token)
        assert loaded.tokenizer.image_token == token
        (answer,) = loaded.generate([Prompt(query_with_images(QUESTION, 1), [image])], max_new_tokens=4)
        assert answer.strip(), bundle  # (not vacuous: the tiny model says something)


def test_preflight_shows_the_qwen2_placeholders(project, capsys):
    from dataset import preflight

    assert preflight.main(["--config", str(project["config"])]) == 0
    out = capsys.readouterr().out
    assert "<image×16>" in out and "<|im_start|>assistant" in out
    assert "OK: labels and image tags are consistent" in out


# ------------------------------------------------------------------------------ generation on a Qwen2.5 + SigLIP bundle


@pytest.fixture(scope="module")
def bundle(tiny_qwen2_siglip_bundle_dir):
    return tiny_qwen2_siglip_bundle_dir


@pytest.fixture(scope="module")
def loaded(bundle):
    return load_checkpoint(bundle, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from demo.synthetic import Item, draw_image

    folder = tmp_path_factory.mktemp("images")
    items = [Item("red", "circle", "top left"), Item("blue", "square", "bottom right")]
    for i, item in enumerate(items):
        draw_image(item, 56, np.random.default_rng(i)).save(folder / f"{i}.png")
    return [folder / f"{i}.png" for i in range(len(items))]


def answer(loaded, text: str, paths, max_new_tokens: int = 8) -> str:
    prompt = Prompt(query_with_images(text, len(paths)), [load_image(p) for p in paths])
    return loaded.generate([prompt], max_new_tokens=max_new_tokens)[0]


def test_infer_one_image_stream_and_batch_give_the_shared_answers(bundle, loaded, images, tmp_path, capsys):
    import infer

    red, blue = images
    expected = answer(loaded, QUESTION, [red])
    assert expected != answer(loaded, QUESTION, [blue])  # the image matters: the comparisons below mean something
    single = ["--checkpoint", str(bundle), "--image", str(red), "--prompt", QUESTION, "--max-new-tokens", "8",
              "--device", "cpu"]
    for stream in ([], ["--stream"]):
        capsys.readouterr()
        assert infer.main([*single, *stream]) == 0
        assert capsys.readouterr().out == expected + "\n", stream

    rows = [{"id": "red", "images": [str(red)], "prompt": QUESTION},
            {"id": "two", "images": [str(blue), str(red)], "prompt": "Is <image> like <image>?"},
            {"id": "text", "prompt": "Say hi."}]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert infer.main(["--checkpoint", str(bundle), "--batch", str(tmp_path / "batch.jsonl"), "--output",
                       str(tmp_path / "answers.jsonl"), "--max-new-tokens", "8", "--device", "cpu"]) == 0
    got = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    # batched (left-padded) answers are each prompt's answer alone
    assert [(g["id"], g["answer"]) for g in got] == [(r["id"], answer(loaded, r["prompt"], r.get("images", [])))
                                                     for r in rows]


def test_webui_answer_path_streams_the_shared_answer_and_follow_ups_see_the_earlier_turn(loaded, images):
    """What webui.py does for each message (`fit`, `chat_prompt`, `stream`), on the Qwen2.5 + SigLIP bundle."""
    red = load_image(images[0])

    def streamed(prompt):
        seen = list(loaded.stream(prompt, max_new_tokens=12))
        assert len(seen) >= 3, seen  # it streamed: the answer grew, each text a beginning of the next
        for shorter, longer in zip(seen, seen[1:]):
            assert longer.strip().startswith(shorter.strip()), seen
        assert seen[-1] == loaded.generate([prompt], max_new_tokens=12)[0]
        return seen[-1]

    q1 = query_with_images(QUESTION, 1)
    first = streamed(chat_prompt(q1, [red], []))
    history = loaded.fit("Which corner is it in?", [Turn(q1, [red], first)])
    assert len(history) == 1
    second = streamed(chat_prompt("Which corner is it in?", [], history))
    alone = loaded.generate([chat_prompt("Which corner is it in?", [], [])], max_new_tokens=12)[0]
    assert second != alone  # the earlier turn and its image reached the model


def test_evaluate_generation_mode_gives_the_shared_answers(project, bundle, loaded, tmp_path):
    import evaluate

    data = project["root"] / "data" / "train.val.jsonl"
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(bundle), "--data", str(data), "--max-new-tokens", "6", "--output",
                          str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and json.loads((out / "metrics.json").read_text())["settings"]["checkpoint"] == str(bundle)
    for row in rows:
        assert row["prediction"] == answer(loaded, row["prompt"], row["images"], max_new_tokens=6), row["id"]


def test_export_llava_runs_and_the_qwen_format_refuses_a_qwen2_bundle(bundle, tmp_path, capsys):
    from model.export import main as export_main

    assert export_main(["--checkpoint", str(bundle), "--output", str(tmp_path / "llava"), "--format", "llava"]) == 0
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert (config["model_type"], config["text_config"]["model_type"], config["vision_config"]["model_type"]) == (
        "llava", "qwen2", "siglip_vision_model")

    capsys.readouterr()
    assert export_main(["--checkpoint", str(bundle), "--output", str(tmp_path / "qwen"), "--format", "qwen"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format qwen" in err and "qwen2" in err and "--format llava" in err
    assert not (tmp_path / "qwen").exists()
