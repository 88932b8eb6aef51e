"""train.py's arguments: four dataclasses, config.yaml as the base, command-line flags on top.

    python train.py --config config.yaml --learning_rate 1e-4 --lora_r 32

The YAML sections `model`, `lora` and `training` map one to one onto `ModelArguments`, `LoraArguments` and
`TrainArguments` (a `transformers.TrainingArguments` with `projector_learning_rate` added); from the `data`
section (the one `process_image.py` reads) training takes the processed files and `max_length`. An unknown
key in any section, or an unknown flag, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from model.lora import DEFAULT_LORA_TARGETS
from settings import ConfigError, ModelConfig, check_keys, load_data_config, read_yaml, resolve_path

KNOWN_SECTIONS = ("demo", "model", "data", "lora", "training")


@dataclass
class ModelArguments(ModelConfig):
    pass


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "processed JSONL (default: data.output)"})
    eval_file: str | None = field(default=None, metadata={"help": "validation JSONL (default: written beside data.output)"})
    max_length: int = field(default=2048, metadata={"help": "tokens per sample, image placeholders included"})
    feature_cache: str | None = field(default=None, metadata={
        "help": "folder of CLIP features from `process_image.py --cache-features` (empty: decode the images)"})


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_embeddings: bool = field(
        default=False, metadata={"help": "also train wte and lm_head (needed when starting from base Qwen-7B)"}
    )


@dataclass
class TrainArguments(TrainingArguments):
    projector_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the projector"})
    output_dir: str | None = field(default="outputs/run", metadata={"help": "checkpoints, logs and the final bundle"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep False: pixel_values must reach the model"})


def _config_defaults(config_path: Path) -> dict:
    """Flatten the config's sections into {field name: value}, checking every key."""
    raw = read_yaml(config_path)
    check_keys(raw, list(KNOWN_SECTIONS), str(config_path))
    base = config_path.resolve().parent
    defaults = {}
    for section, cls in (("model", ModelArguments), ("lora", LoraArguments), ("training", TrainArguments)):
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{config_path}: section {section!r} must be a mapping")
        check_keys(values, [f.name for f in dataclasses.fields(cls) if f.init], f"{config_path}: {section}")
        defaults.update(values)
    for key in ("llm_path", "vision_path", "output_dir", "logging_dir", "deepspeed"):
        if isinstance(defaults.get(key), str):
            defaults[key] = resolve_path(defaults[key], base)
    if "data" in raw:
        data = load_data_config(config_path)
        defaults.update(
            train_file=data.output,
            eval_file=data.resolved_val_output(),
            max_length=data.max_length,
            feature_cache=data.feature_cache,
        )
    return defaults


def parse_args(argv: list[str] | None = None):
    """-> (ModelArguments, DataArguments, LoraArguments, TrainArguments, config path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = Path("config.yaml")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path")
        config_path = Path(argv[i + 1])
        del argv[i : i + 2]
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainArguments))
    defaults = _config_defaults(config_path)
    # The machine decides the precision unless the config does: fp32 with use_cpu on CPU (without use_cpu, DDP
    # is silently skipped on a CPU machine), bf16 on a GPU that has it.
    import torch

    if not torch.cuda.is_available():
        defaults.setdefault("use_cpu", True)
    elif "bf16" not in defaults and "fp16" not in defaults and torch.cuda.is_bf16_supported():
        defaults["bf16"] = True
    parser.set_defaults(**defaults)
    # Required fields (the model paths) may come from the config: make argparse accept their absence.
    for action in parser._actions:
        if action.dest in ("llm_path", "vision_path") and action.default is not None:
            action.required = False
    model_args, data_args, lora_args, train_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise ConfigError(f"unknown command-line arguments: {' '.join(unknown)}")
    return model_args, data_args, lora_args, train_args, config_path
