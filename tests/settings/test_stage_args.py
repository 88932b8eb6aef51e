"""train.py's arguments for the two stages: the align section's values on top of training's for `--stage align`, the
instruct stage's default start projector, and every mistake in the align section as one ConfigError naming it."""

from __future__ import annotations

import pytest
import yaml

from settings import ConfigError
from settings.training import parse_train_args


def write_config(tmp_path, align=None, model=None, **training):
    raw = {"model": {"llm_path": "llm", "vision_path": "clip", **(model or {})},
           "training": {"output_dir": "out", "report_to": "none", "learning_rate": 2.0e-4,
                        "projector_learning_rate": 2.0e-5, "per_device_train_batch_size": 16, **training}}
    if align is not None:
        raw["align"] = align
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


ALIGN = {"output_dir": "out-align", "projector_learning_rate": 1.0e-3, "per_device_train_batch_size": 32,
         "weight_decay": 0.0, "sources": ["aic"]}


def test_each_stage_takes_its_own_values(tmp_path):
    path = write_config(tmp_path, ALIGN, weight_decay=0.1)
    align = parse_train_args(["--config", str(path), "--stage", "align"])
    assert align.args.stage == "align" and align.args.output_dir == str(tmp_path / "out-align")
    assert (align.args.projector_learning_rate, align.args.per_device_train_batch_size) == (1e-3, 32)
    assert align.args.weight_decay == 0.0 and align.args.learning_rate == 2e-4  # training's, where align is silent
    assert align.data.sources == ["aic"] and align.model.projector_path is None

    instruct = parse_train_args(["--config", str(path)])
    assert instruct.args.stage == "instruct" and instruct.args.output_dir == str(tmp_path / "out")
    assert (instruct.args.projector_learning_rate, instruct.args.per_device_train_batch_size) == (2e-5, 16)
    assert instruct.args.weight_decay == 0.1 and instruct.data.sources is None
    assert instruct.model.projector_path == str(tmp_path / "out-align")  # the align run's bundle starts it

    # flags win over both sections; `--stage=align` is the same flag
    flagged = parse_train_args(["--config", str(path), "--stage=align", "--projector_learning_rate", "3e-3",
                                "--sources", "aic", "llava"])
    assert flagged.args.projector_learning_rate == 3e-3 and flagged.data.sources == ["aic", "llava"]
    assert parse_train_args(["--config", str(path), "--projector_path", ""]).model.projector_path == ""


def test_the_start_projector(tmp_path):
    assert parse_train_args(["--config", str(write_config(tmp_path))]).model.projector_path is None  # no align
    path = write_config(tmp_path, ALIGN, model={"projector_path": "elsewhere"})
    assert parse_train_args(["--config", str(path)]).model.projector_path == str(tmp_path / "elsewhere")
    path = write_config(tmp_path, model={"projector_path": "elsewhere"}, stage="instruct")
    assert parse_train_args(["--config", str(path)]).model.projector_path == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("align,argv,expected", [
    (None, ["--stage", "align"], "{path}: no 'align' section: the align stage takes its output_dir"),
    ({"projector_learning_rate": 1e-3}, [], "{path}: align: missing required key 'output_dir'"),
    ({"output_dir": "out"}, [], "{path}: align.output_dir: {dir}/out is training.output_dir too"),
    ({"output_dir": "a", "stage": "align"}, [], "{path}: align.stage: not a key of this section"),
    ({"output_dir": "a", "projector_learnig_rate": 1e-3}, [],
     "{path}: align: unknown key 'projector_learnig_rate' (did you mean 'projector_learning_rate'?)"),
    ({"output_dir": "a", "learning_rate": "fast"}, [], "{path}: align.learning_rate: expected a number, got 'fast'"),
    ({"output_dir": "a", "sources": "aic"}, [], "{path}: align.sources: expected a non-empty list"),
    ({"output_dir": "a", "sources": []}, [], "{path}: align.sources: expected a non-empty list"),
    ({"output_dir": "a"}, ["--stage", "pretrain"], "--stage: 'pretrain' is not one of: align, instruct"),
    ([1, 2], [], "{path}: align: expected a mapping, got [1, 2]"),
])
def test_align_section_mistakes_are_one_config_error(tmp_path, align, argv, expected):
    path = write_config(tmp_path, align)
    with pytest.raises(ConfigError) as e:
        parse_train_args(["--config", str(path), *argv])
    message = str(e.value)
    assert message.startswith(expected.format(path=path, dir=tmp_path)) and "\n" not in message


def test_a_wrong_stage_in_training_names_the_key(tmp_path):
    path = write_config(tmp_path, stage="pretrain")
    with pytest.raises(ConfigError, match=r"training\.stage: expected one of: 'align', 'instruct', got 'pretrain'"):
        parse_train_args(["--config", str(path)])


def test_the_real_recipe_has_llava_15_global_batches_and_rates_per_stage():
    """configs/qwen7b_coco.yaml: stage 1 as LLaVA-1.5's pretrain.sh, stage 2 as its finetune_lora.sh (8 GPUs)."""
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[2] / "configs" / "qwen7b_coco.yaml")
    align = parse_train_args(["--config", config, "--stage", "align"])
    instruct = parse_train_args(["--config", config])
    assert align.args.per_device_train_batch_size * align.args.gradient_accumulation_steps * 8 == 256
    assert instruct.args.per_device_train_batch_size * instruct.args.gradient_accumulation_steps * 8 == 128
    assert (align.args.projector_learning_rate, align.args.weight_decay, align.args.num_train_epochs) == (1e-3, 0, 1)
    assert (instruct.args.learning_rate, instruct.args.projector_learning_rate) == (2e-4, 2e-5)
    assert align.args.warmup_steps == instruct.args.warmup_steps == 0.03
    assert align.args.lr_scheduler_type == instruct.args.lr_scheduler_type == "cosine"
    assert align.data.sources == ["aic"] and instruct.data.sources is None
    assert instruct.model.projector_path == align.args.output_dir != instruct.args.output_dir


# The Qwen2.5 + SigLIP recipes: file, GPUs its per-device figures are for.
SIGLIP_RECIPES = [("qwen2.5-7b_siglip.yaml", 8), ("qwen2.5-1.5b_siglip.yaml", 1)]


@pytest.mark.parametrize("name,gpus", SIGLIP_RECIPES)
def test_the_qwen25_siglip_recipes_have_llava_15_global_batches_and_rates_per_stage(name, gpus):
    """configs/qwen2.5-*_siglip.yaml load with the strict loader and validate against TrainArguments as train.py
    and dataset.preflight do (no model folder needed): LLaVA-1.5's global batches on the GPUs each is written for,
    its learning rates, LLaVA-OneVision's projector stage (1e-3, weight decay 0), and the two stages chained."""
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[2] / "configs" / name)
    align = parse_train_args(["--config", config, "--stage", "align"])
    instruct = parse_train_args(["--config", config])
    assert align.args.per_device_train_batch_size * align.args.gradient_accumulation_steps * gpus == 256
    assert instruct.args.per_device_train_batch_size * instruct.args.gradient_accumulation_steps * gpus == 128
    assert (align.args.projector_learning_rate, align.args.weight_decay, align.args.num_train_epochs) == (1e-3, 0, 1)
    assert (instruct.args.learning_rate, instruct.args.projector_learning_rate) == (2e-4, 2e-5)
    assert instruct.args.weight_decay == 0 and instruct.args.num_train_epochs == 1
    assert align.args.warmup_steps == instruct.args.warmup_steps == 0.03
    assert align.args.lr_scheduler_type == instruct.args.lr_scheduler_type == "cosine"
    assert instruct.args.activation_checkpointing
    assert align.data.sources == ["aic"] and instruct.data.sources is None
    assert instruct.model.projector_path == align.args.output_dir != instruct.args.output_dir


@pytest.mark.parametrize("name,gpus", SIGLIP_RECIPES)
def test_the_qwen25_siglip_recipes_model_lora_and_data(name, gpus):
    """The backbone choices: SigLIP's penultimate layer (LLaVA-OneVision's features), Qwen2.5-Instruct's own default
    system prompt, the family's LoRA targets with Qwen's LoRA shape, no trained embeddings; and the data section of
    configs/qwen7b_coco.yaml, so that data processed for one recipe trains the others."""
    from pathlib import Path

    from llm.tiny import QWEN2_5_DEFAULT_SYSTEM
    from settings import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    config = load_config(configs / name)
    assert config.model.vision_feature_layer == -2
    assert config.model.system_prompt == QWEN2_5_DEFAULT_SYSTEM
    assert config.model.llm_path.endswith("Instruct") and config.model.vision_path.endswith("siglip-so400m-patch14-384")
    lora = config.lora
    assert lora.lora_target_modules is None and not lora.train_embeddings
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (64, 16, 0.05)
    assert config.data == load_config(configs / "qwen7b_coco.yaml").data
