"""train.py's arguments: the config file as the base, command-line flags on top.

    python train.py --config config.yaml --learning_rate 1e-4 --lora_r 32

The `model`, `lora` and `training` sections map one to one onto `ModelConfig`, `LoraConfig` and
`TrainArguments` (a `transformers.TrainingArguments` with our fields added); from the `data` section
training takes the processed files, `max_length` and `feature_cache` (`DataArguments`). Every field of
the four can be given as a flag. An unknown key in any section, an unknown or abbreviated flag, a flag's
unusable value and a training value of the wrong type (checked against the `TrainArguments` field's type
before argparse sees it) are each one `ConfigError` naming the key or flag.

Two stages (`training.stage`, or `--stage`): `instruct` (the default) trains LoRA + projector; `align` trains the
projector alone, with the training values of the config's `align` section on top of `training` (its own
output_dir, learning rates, batch size, ...) and its `sources`. A config with an `align` section starts the
instruct stage from the align run's projector (`model.projector_path` defaults to `align.output_dir`).
This module imports transformers (seconds): only train.py and the demo's evaluation use it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainingArguments

from .loading import Config, ConfigError, check_keys, check_value, load_config
from .sections import DataConfig, LoraConfig, ModelConfig


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "processed JSONL (default: data.output)"})
    eval_file: str | None = field(default=None, metadata={
        "help": "validation JSONL (default: written beside data.output)"})
    max_length: int = field(default=DataConfig.max_length, metadata={
        "help": "tokens per sample, image placeholders included"})
    feature_cache: str | None = field(default=None, metadata={
        "help": "folder of CLIP features from `process_image.py --cache-features` (empty: decode the images)"})
    sources: list[str] | None = field(default=None, metadata={
        "help": "train and evaluate only on the samples of these sources: names or formats of data.sources "
                "(default: all; the align section's `sources` for the align stage)"})


@dataclass
class TrainArguments(TrainingArguments):
    stage: Literal["align", "instruct"] = field(default="instruct", metadata={
        "help": "align: only the projector trains (no LoRA; LLM and tower frozen), with the config's `align` "
                "section on top of `training`; instruct: LoRA + projector"})
    projector_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the projector"})
    output_dir: str | None = field(default="outputs/run", metadata={"help": "checkpoints, logs and the final bundle"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace the previous run in a non-empty output_dir: its checkpoints, bundle, metrics and logs are "
                "deleted first (without it, and without --resume_from_checkpoint, a non-empty output_dir is refused)"})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "keep False: pixel_values must reach the model"})
    eval_generation_samples: int = field(default=0, metadata={
        "help": "at each evaluation, generate answers for this many validation samples and log CIDEr, BLEU-4 and "
                "accuracy (evaluation/callback.py; 0: off)"})


@dataclass
class TrainSetup:
    """Everything train.py runs with: the config file's sections with the command-line flags applied."""

    model: ModelConfig
    data: DataArguments
    lora: LoraConfig
    args: TrainArguments
    config: Config


def check_training_types(training: dict, where: str) -> None:
    """Refuse a training value of the wrong type, naming the key and the file (instead of argparse's complaint
    about a command-line flag the user never typed). The values become argparse defaults, which argparse converts
    from strings (`from_flags`)."""
    hints = typing.get_type_hints(TrainArguments)
    for key, value in training.items():
        if key in hints:
            check_value(value, hints[key], f"{where}.{key}", from_flags=True)


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one ConfigError line (not a usage dump and SystemExit)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see `python train.py --help`)")


STAGES = typing.get_args(typing.get_type_hints(TrainArguments)["stage"])


def _training_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainArguments) if f.init]


def check_align_section(config: Config) -> dict | None:
    """The config's `align` section, checked: any training key but `stage` (and the align stage's own
    `output_dir`, required and not training's), plus `sources` (a list of source names or formats)."""
    align = config.align
    if align is None:
        return None
    where = f"{config.path}: align"
    if "stage" in align:
        raise ConfigError(f"{where}.stage: not a key of this section: the align section is the align stage "
                          "(`train.py --stage align` runs it)")
    check_keys(align, _training_keys() + ["sources"], where)
    check_training_types({k: v for k, v in align.items() if k != "sources"}, where)
    sources = align.get("sources")
    if sources is not None and (not isinstance(sources, list) or not sources
                                or not all(isinstance(x, str) and x for x in sources)):
        raise ConfigError(f"{where}.sources: expected a non-empty list of source names or formats, got {sources!r}")
    if not isinstance(align.get("output_dir"), str) or not align["output_dir"]:
        raise ConfigError(f"{where}: missing required key 'output_dir' (the align stage's own folder)")
    instruct_dir = config.training.get("output_dir", TrainArguments.output_dir)
    if isinstance(instruct_dir, str) and os.path.abspath(align["output_dir"]) == os.path.abspath(instruct_dir):
        raise ConfigError(f"{where}.output_dir: {align['output_dir']} is training.output_dir too: each stage needs "
                          "its own folder")
    return align


def requested_stage(argv: list[str], config: Config) -> str:
    """The stage a command line asks for: its last `--stage` flag, else `training.stage`, else instruct."""
    stage = config.training.get("stage", "instruct")
    for i, arg in enumerate(argv):
        if arg == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
        elif arg.startswith("--stage="):
            stage = arg.split("=", 1)[1]
    return stage


def _defaults(config: Config, stage: str = "instruct") -> dict:
    """{field name: value} of the config's model, lora and training sections (and, for the align stage, its
    align section) and of the data it trains on."""
    check_keys(config.training, _training_keys(), f"{config.path}: training")
    check_training_types(config.training, f"{config.path}: training")
    align = check_align_section(config)
    if stage not in STAGES:
        raise ConfigError(f"--stage: {stage!r} is not one of: {', '.join(STAGES)}")
    training = dict(config.training)
    if stage == "align":
        if align is None:
            raise ConfigError(f"{config.path}: no 'align' section: the align stage takes its output_dir, learning "
                              "rates and sources from it (docs/COMMANDS.md, 'Two stages')")
        training.update({k: v for k, v in align.items() if k != "sources"}, stage="align")
    defaults = {}
    if config.model is not None:
        defaults.update(dataclasses.asdict(config.model))
    defaults.update(dataclasses.asdict(config.lora))
    defaults.update(training)
    if config.data is not None:
        defaults.update(
            train_file=config.data.output,
            eval_file=config.data.resolved_val_output(),
            max_length=config.data.max_length,
            feature_cache=config.data.feature_cache,
        )
    if stage == "align" and align.get("sources") is not None:
        defaults["sources"] = list(align["sources"])
    if stage == "instruct" and align is not None and defaults.get("projector_path") is None:
        defaults["projector_path"] = align["output_dir"]  # the align run's final bundle starts this stage
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
    # allow_abbrev=False: `--learning_rat 3` is an unknown flag, not --learning_rate
    parser = _Parser((ModelConfig, DataArguments, LoraConfig, TrainArguments), allow_abbrev=False)
    stage = requested_stage(argv, config)
    parser.set_defaults(**_defaults(config, stage))
    # Required fields (the model paths) may come from the config: make argparse accept their absence.
    for action in parser._actions:
        if action.dest in ("llm_path", "vision_path") and action.default is not None:
            action.required = False
    model, data, lora, args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError(f"unknown command-line arguments: {' '.join(unknown)}")
    assert args.stage == stage, (args.stage, stage)  # the defaults were those of the stage that runs
    return TrainSetup(model=model, data=data, lora=lora, args=args, config=config)
