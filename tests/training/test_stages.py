"""The two training stages through train.py's main (in-process, tiny models): the align stage trains the projector
and nothing else, without LoRA, and writes a bundle that loads; the instruct stage starts from exactly that
projector; bad projector folders and stage mix-ups are one line and exit status 2; the source filter keeps exactly
the named sources."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import train
from dataprocess.schema import read_samples
from model import build_vlm, load_vlm
from settings import ConfigError, load_config
from tests.projects import write_test_project
from training.stages import resolve_sources, sample_filter

FAST = ["--report_to", "none", "--disable_tqdm", "true", "--eval_strategy", "no", "--save_strategy", "no"]
SAVE_EACH_STEP = ["--report_to", "none", "--disable_tqdm", "true", "--eval_strategy", "no", "--save_strategy", "steps",
                  "--save_steps", "1"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llm_dir, tiny_clip_dir):
    """Tiny models, a small processed demo data set (LLaVA conversations + AI Challenger captions) and a config
    with both stages: align on the captions only, instruct on everything."""
    return write_test_project(
        tmp_path_factory.mktemp("stages"), tiny_llm_dir, tiny_clip_dir, n_train=12, n_aic=12,
        training={"output_dir": "out/instruct", "seed": 3, "max_steps": 2, "per_device_train_batch_size": 4,
                  "learning_rate": 5.0e-3, "projector_learning_rate": 1.0e-3, "warmup_steps": 0, "logging_steps": 1},
        align={"output_dir": "out/align", "projector_learning_rate": 5.0e-2, "max_steps": 3, "sources": ["aic"]},
    )


class Recorder:
    """Stands in for train.VLMTrainer: records the model and its state just before the first optimizer step."""

    def __init__(self):
        self.runs = []
        recorder = self

        class RecordingTrainer(train.VLMTrainer):
            def train(self, *args, **kwargs):
                start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                recorder.runs.append({"model": self.model, "start": start})
                return super().train(*args, **kwargs)

        self.trainer = RecordingTrainer


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(train, "VLMTrainer", rec.trainer)
    return rec


@pytest.fixture(scope="module")
def align_run(project, tiny_llm_dir, tiny_clip_dir):
    """The align stage run once for the module: its model before the first step and after the last."""
    rec = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "VLMTrainer", rec.trainer)
        code = train.main(["--config", str(project / "config.yaml"), "--stage", "align", *FAST])
    assert code == 0
    (run,) = rec.runs
    return run


def projector_of(state: dict) -> dict:
    return {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}


def test_align_trains_the_projector_and_nothing_else(project, align_run, tiny_llm_dir, tiny_clip_dir):
    model, start = align_run["model"], align_run["start"]
    end = model.state_dict()
    assert not model.has_adapter
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "projector.linear_1.weight", "projector.linear_1.bias", "projector.linear_2.weight", "projector.linear_2.bias"]
    # every tensor of the LLM (embeddings and lm_head included) and of the tower: bit-identical to the files
    fresh = build_vlm(tiny_llm_dir, tiny_clip_dir).state_dict()
    assert set(end) == set(fresh)
    others = [k for k in end if not k.startswith("projector.")]
    assert any(k.startswith("vision_tower.") for k in others) and "language_model.transformer.wte.weight" in others
    assert "language_model.lm_head.weight" in others
    for key in others:
        assert torch.equal(end[key], fresh[key]), key
        assert torch.equal(end[key], start[key]), key
    for key, value in projector_of(end).items():  # every projector tensor moved
        assert not torch.equal(value, projector_of(start)[key]), key

    out = project / "out" / "align"
    assert {p.name for p in out.iterdir()} >= {"projector.safetensors", "vlm_config.json"}
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "vlm_config.json").read_text())["adapter"] is False
    saved = load_file(str(out / "projector.safetensors"))
    for key, value in projector_of(end).items():
        assert torch.equal(saved[key], value), key

    # the align bundle loads for inference (no adapter): exactly the trained model
    loaded, config = load_vlm(out)
    assert not config.adapter and not loaded.has_adapter
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(end)
    for key in end:
        assert torch.equal(loaded_state[key], end[key]), key


def test_align_bundle_answers_through_the_inference_loader(project, align_run, tiny_llm_dir, tiny_clip_dir):
    """infer.py's loader takes the bundle without adapter and answers what the trained model answers."""
    from inference import Prompt, generate_answers, load_checkpoint
    from qwen import QWenTokenizer
    from visual import ImagePreprocessor, load_image

    checkpoint = load_checkpoint(project / "out" / "align", device="cpu")
    image = load_image(next((project / "raw" / "heldout_images").iterdir()))
    prompt = Prompt("<image>\nWhat colour is the shape?", [image])
    (answer,) = checkpoint.generate([prompt], max_new_tokens=4)
    (expected,) = generate_answers(
        align_run["model"].eval(), QWenTokenizer.from_pretrained(tiny_llm_dir),
        ImagePreprocessor.from_pretrained(tiny_clip_dir), [prompt], system=checkpoint.config.system_prompt,
        num_image_tokens=checkpoint.config.vision.num_image_tokens, max_new_tokens=4)
    assert answer == expected and expected.strip()  # (not vacuous: the tiny model says something)


def test_align_stage_trains_only_on_the_named_sources(project, align_run, capsys, recorder):
    """The align run's dataset holds exactly the caption samples of the processed file."""
    train_file = project / "data" / "train.jsonl"
    samples = [s for _, _, s in read_samples(str(train_file))]
    aic = [s["id"] for s in samples if s["source"] == "aic_demo"]
    assert aic and len(aic) < len(samples)  # the file has both kinds: the filter has something to do
    code = train.main(["--config", str(project / "config.yaml"), "--stage", "align", "--max_steps", "1",
                       "--output_dir", str(project / "out" / "align-count"), *FAST])
    assert code == 0
    assert f"align stage: {len(aic)} training samples of sources aic_demo with an image ({len(samples) - len(aic)} " \
           "others left out)" in capsys.readouterr().out


def test_align_with_activation_checkpointing_takes_the_same_step(project, tmp_path, recorder):
    """The frozen LLM under (non-reentrant) activation checkpointing still passes the projector its gradients:
    one SGD step lands on the same projector as without checkpointing (and moves it)."""
    common = ["--config", str(project / "config.yaml"), "--stage", "align", "--max_steps", "1", "--optim", "sgd",
              "--max_grad_norm", "0", "--projector_learning_rate", "0.5", *FAST]
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        assert train.main([*common, "--output_dir", str(tmp_path / name), "--activation_checkpointing", flag]) == 0
    plain = load_file(str(tmp_path / "plain" / "projector.safetensors"))
    checkpointed = load_file(str(tmp_path / "checkpointed" / "projector.safetensors"))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
    assert [run["model"].llm.transformer.gradient_checkpointing for run in recorder.runs] == [False, True]
    start = projector_of(recorder.runs[0]["start"])
    assert torch.equal(start["linear_1.weight"], projector_of(recorder.runs[1]["start"])["linear_1.weight"])
    assert (plain["linear_1.weight"] - start["linear_1.weight"]).abs().max() > 1e-4


def test_instruct_starts_from_the_align_projector_exactly(project, align_run, recorder):
    code = train.main(["--config", str(project / "config.yaml"), *FAST])
    assert code == 0
    (run,) = recorder.runs
    aligned = load_file(str(project / "out" / "align" / "projector.safetensors"))
    start = projector_of(run["start"])
    assert set(start) == set(aligned)
    for key, value in aligned.items():
        assert torch.equal(start[key], value), key
    model = run["model"]
    assert model.has_adapter
    assert any("lora_A" in name for name, p in model.named_parameters() if p.requires_grad)
    out = project / "out" / "instruct"
    assert (out / "adapter_model.safetensors").is_file()
    final = load_file(str(out / "projector.safetensors"))
    assert not torch.equal(final["linear_1.weight"], aligned["linear_1.weight"])  # and it kept training


def test_the_projector_path_is_not_applied_when_resuming(project, align_run, recorder, tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main(["--config", str(project / "config.yaml"), "--output_dir", str(first), "--max_steps", "1",
                       "--projector_path", "", *SAVE_EACH_STEP]) == 0
    capsys.readouterr()
    code = train.main(["--config", str(project / "config.yaml"), "--output_dir", str(tmp_path / "second"),
                       "--resume_from_checkpoint", str(first / "checkpoint-1"), *FAST])
    assert code == 0
    assert "not loaded: resuming restores the checkpoint's projector" in capsys.readouterr().out
    # before the Trainer restores the checkpoint, the model holds a fresh projector, not the align run's
    start = projector_of(recorder.runs[-1]["start"])
    aligned = load_file(str(project / "out" / "align" / "projector.safetensors"))
    assert not torch.equal(start["linear_1.weight"], aligned["linear_1.weight"])


def error_line(capsys) -> str:
    """The one error line train.py printed (stderr may also hold the weight loader's progress bar)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_projector_folders_are_one_line_and_exit_2(project, align_run, tmp_path, capsys):
    config = ["--config", str(project / "config.yaml"), "--output_dir", str(tmp_path / "out"), *FAST]

    assert train.main([*config, "--projector_path", str(tmp_path / "nowhere")]) == 2
    assert f"model.projector_path: folder not found: {tmp_path / 'nowhere'}" in error_line(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main([*config, "--projector_path", str(empty)]) == 2
    assert f"model.projector_path: {empty} has no projector.safetensors" in error_line(capsys)

    wrong = tmp_path / "wrong-shape"
    wrong.mkdir()
    aligned = load_file(str(project / "out" / "align" / "projector.safetensors"))
    save_file({**aligned, "linear_2.weight": torch.zeros(16, aligned["linear_2.weight"].shape[1])},
              str(wrong / "projector.safetensors"))
    assert train.main([*config, "--projector_path", str(wrong)]) == 2
    line = error_line(capsys)
    assert "model.projector_path:" in line and "linear_2.weight: file (16, " in line

    other_layer = tmp_path / "other-layer"
    shutil.copytree(project / "out" / "align", other_layer)
    bundle = json.loads((other_layer / "vlm_config.json").read_text())
    bundle["vision"]["feature_layer"] = -1
    (other_layer / "vlm_config.json").write_text(json.dumps(bundle))
    assert train.main([*config, "--projector_path", str(other_layer)]) == 2
    assert "vision.feature_layer: checkpoint -1 vs now -2" in error_line(capsys)
    assert not (tmp_path / "out").exists()  # nothing written


def test_stage_mix_ups_are_refused(project, align_run, tmp_path, capsys):
    no_align = tmp_path / "c.yaml"
    raw = yaml.safe_load((project / "config.yaml").read_text())
    del raw["align"]
    raw["training"]["output_dir"] = str(tmp_path / "x")
    no_align.write_text(yaml.safe_dump(raw))
    assert train.main(["--config", str(no_align), "--stage", "align", *FAST]) == 2
    assert f"{no_align}: no 'align' section" in error_line(capsys)

    # an instruct checkpoint (with LoRA) cannot resume the align stage, nor an align one the instruct stage
    config = ["--config", str(project / "config.yaml"), "--max_steps", "1"]
    assert train.main([*config, "--output_dir", str(tmp_path / "i"), *SAVE_EACH_STEP]) == 0
    assert train.main([*config, "--stage", "align", "--output_dir", str(tmp_path / "a"), *SAVE_EACH_STEP]) == 0
    capsys.readouterr()
    assert train.main([*config, "--stage", "align", "--output_dir", str(tmp_path / "a2"),
                       "--resume_from_checkpoint", str(tmp_path / "i" / "checkpoint-1"), *FAST]) == 2
    assert "LoRA adapter: the checkpoint has one, the model now has none" in error_line(capsys)
    assert train.main([*config, "--output_dir", str(tmp_path / "i2"), "--resume_from_checkpoint",
                       str(tmp_path / "a" / "checkpoint-1"), *FAST]) == 2
    assert "an align-stage checkpoint cannot resume the instruct stage" in error_line(capsys)


def test_source_filter_keeps_exactly_the_named_sources(project, tok_tiny, tmp_path):
    from dataset import SupervisedDataset

    data = load_config(project / "config.yaml").data
    assert resolve_sources(["aic"], data) == ["aic_demo"]  # by format
    assert resolve_sources(["llava_demo", "aic"], data) == ["llava_demo", "aic_demo"]  # by name, then format
    with pytest.raises(ConfigError, match="sources: 'coco' is neither the name nor the format of a data source"):
        resolve_sources(["coco"], data)

    # the processed file plus one text-only caption sample, by hand
    rows = [json.loads(line) for line in (project / "data" / "train.jsonl").read_text().splitlines()]
    text_only = {"id": "aic_demo:text", "source": "aic_demo", "images": [],
                 "turns": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, text_only]))

    def ids(keep):
        ds = SupervisedDataset(path, tok_tiny, lambda images: torch.zeros(len(images), 3, 56, 56),
                               num_image_tokens=16, system="s", max_length=512, keep=keep)
        return [ds.sample(i)["id"] for i in range(len(ds))], ds.num_filtered

    everything, _ = ids(None)
    assert len(everything) == len(rows) + 1
    captions, dropped = ids(sample_filter(["aic_demo"], need_images=False))
    assert captions == [r["id"] for r in rows if r["source"] == "aic_demo"] + ["aic_demo:text"]
    assert dropped == sum(r["source"] != "aic_demo" for r in rows)
    with_images, _ = ids(sample_filter(["aic_demo"], need_images=True))
    assert with_images == captions[:-1]
    assert sample_filter(None, need_images=False) is None
