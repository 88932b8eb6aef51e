"""train.py's arguments: the config file as the base, command-line flags on top.

    python train.py --config config.yaml --learning_rate 1e-4 --lora_r 32

The `model`, `lora` and `training` sections map one to one onto `ModelConfig`, `LoraConfig` and
`TrainArguments` (a `transformers.TrainingArguments` with our fields added); from the `data` section
training takes the processed files, `max_length` and `feature_cache` (`DataArguments`). Every field of
the four can be given as a flag. An unknown key in any section, or an unknown flag, is an error naming it.
This module imports transformers (seconds): only train.py and the demo's evaluation use it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .loading import Config, ConfigError, check_keys, load_config
from .sections import DataConfig, LoraConfig, ModelConfig


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "processed JSONL (default: data.output)"})
    eval_file: str | None = field(default=None, metadata={"help": "validation JSONL (default: written beside data.output)"})
    max_length: int = field(default=DataConfig.max_length, metadata={"help": "tokens per sample, image placeholders included"})
    feature_cache: str | None = field(default=None, metadata={
        "help": "folder of CLIP features from `process_image.py --cache-features` (empty: decode the images)"})


@dataclass
class TrainArguments(TrainingArguments):
    projector_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the projector"})
    output_dir: str | None = field(default="outputs/run", metadata={"help": "checkpoints, logs and the final bundle"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep False: pixel_values must reach the model"})


@dataclass
class TrainSetup:
    """Everything train.py runs with: the config file's sections with the command-line flags applied."""

    model: ModelConfig
    data: DataArguments
    lora: LoraConfig
    args: TrainArguments
    config: Config


def _defaults(config: Config) -> dict:
    """{field name: value} of the config's model, lora and training sections and of the data it trains on."""
    check_keys(config.training, [f.name for f in dataclasses.fields(TrainArguments) if f.init],
               f"{config.path}: training")
    defaults = {}
    if config.model is not None:
        defaults.update(dataclasses.asdict(config.model))
    defaults.update(dataclasses.asdict(config.lora))
    defaults.update(config.training)
    if config.data is not None:
        defaults.update(
            train_file=config.data.output,
            eval_file=config.data.resolved_val_output(),
            max_length=config.data.max_length,
            feature_cache=config.data.feature_cache,
        )
    # The machine decides the precision unless the config does: fp32 with use_cpu on CPU (without use_cpu, DDP
    # is silently skipped on a CPU machine), bf16 on a GPU that has it.
    if not torch.cuda.is_available():
        defaults.setdefault("use_cpu", True)
    elif "bf16" not in defaults and "fp16" not in defaults and torch.cuda.is_bf16_supported():
        defaults["bf16"] = True
    return defaults


def parse_train_args(argv: list[str] | None = None) -> TrainSetup:
    """`--config PATH` (default config.yaml) and any flag of the four dataclasses; raises ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = Path("config.yaml")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path")
        config_path = Path(argv[i + 1])
        del argv[i : i + 2]
    config = load_config(config_path)
    parser = HfArgumentParser((ModelConfig, DataArguments, LoraConfig, TrainArguments))
    parser.allow_abbrev = False  # `--learning_rat 3` is an unknown flag, not --learning_rate
    parser.set_defaults(**_defaults(config))
    # Required fields (the model paths) may come from the config: make argparse accept their absence.
    for action in parser._actions:
        if action.dest in ("llm_path", "vision_path") and action.default is not None:
            action.required = False
    model, data, lora, args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError(f"unknown command-line arguments: {' '.join(unknown)}")
    return TrainSetup(model=model, data=data, lora=lora, args=args, config=config)
