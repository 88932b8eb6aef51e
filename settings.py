"""One typed source of truth for `config.yaml`.

Every section of the YAML file is a dataclass. Loading is strict: an unknown or misspelt key is a
`ConfigError` that names it (and suggests the closest known key), a value of the wrong type too.
Relative paths in the file are resolved against the directory of the file, so a config can be run
from anywhere.

The `model`, `lora` and `training` sections are parsed by `train.py` (through `HfArgumentParser`, so
that command-line flags go on top); `data` is all `process_image.py` needs; `demo` only exists in
the demo config and tells `train.sh` to build the demo's tiny models and synthetic data first.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key and the file."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen-7B-Chat's default


@dataclass
class ModelConfig:
    """The models to build on, and how images reach the LLM. Saved into every checkpoint bundle."""

    llm_path: str  # folder of Qwen-7B-Chat (or Qwen-7B): config.json, *.safetensors, qwen.tiktoken
    vision_path: str  # folder of openai/clip-vit-large-patch14: config.json, weights, preprocessor_config.json
    vision_feature_layer: int = -2  # hidden_states index of the CLIP layer whose patch features are used
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class DataSource:
    """One raw data set: its format, its annotation file and the folder its image paths are relative to."""

    format: str  # "aic" (AI Challenger captions) or "llava" (LLaVA conversations)
    annotations: str
    image_dir: str
    limit: int | None = None  # keep at most this many rows of this source (the first ones)
    name: str | None = None  # shown in the report; defaults to the annotation file's name


@dataclass
class DataConfig:
    sources: list[DataSource]
    output: str  # processed JSON Lines, written by process_image.py
    val_output: str | None = None  # validation split; default: <output stem>.val.jsonl
    val_size: int = 200  # samples held out for validation (at most 5% of the data)
    seed: int = 1234  # prompt choice for captions and the validation split
    num_workers: int = 4  # image-decoding processes in process_image.py (0: in the main process)
    feature_cache: str | None = None  # optional folder of precomputed CLIP features (see README)
    max_length: int = 2048  # tokens per training sample, image placeholders included

    def resolved_val_output(self) -> str:
        if self.val_output:
            return self.val_output
        out = Path(self.output)
        return str(out.with_name(out.stem + ".val" + out.suffix))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(mapping: dict[str, Any], known: list[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), known)}; known keys: {', '.join(known)}")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check (and lightly coerce) one value against a dataclass field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(annotation, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, mapping: dict[str, Any], where: str):
    """Build dataclass `cls` from `mapping`, refusing unknown keys and missing required ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(mapping, list(fields), where)
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _convert(mapping[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    return cls(**kwargs)


def resolve_path(value: str | None, base_dir: Path) -> str | None:
    """A path from a config file: `~` expanded, relative paths taken from the config's directory."""
    if value is None or value == "":
        return value
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base_dir / p))


def load_model_config(config_path: str | Path) -> ModelConfig:
    """The `model` section of a config file, with its paths resolved."""
    config_path = Path(config_path)
    raw = read_yaml(config_path)
    if "model" not in raw:
        raise ConfigError(f"{config_path}: no 'model' section")
    model = build(ModelConfig, raw["model"] or {}, f"{config_path}: model")
    base = config_path.resolve().parent
    model.llm_path = resolve_path(model.llm_path, base)
    model.vision_path = resolve_path(model.vision_path, base)
    return model


def load_data_config(config_path: str | Path) -> DataConfig:
    """The `data` section of a config file, with every path resolved."""
    config_path = Path(config_path)
    raw = read_yaml(config_path)
    if "data" not in raw:
        raise ConfigError(f"{config_path}: no 'data' section")
    data = build(DataConfig, raw["data"] or {}, f"{config_path}: data")
    base = config_path.resolve().parent
    for src in data.sources:
        src.annotations = resolve_path(src.annotations, base)
        src.image_dir = resolve_path(src.image_dir, base)
    data.output = resolve_path(data.output, base)
    data.val_output = resolve_path(data.val_output, base)
    data.feature_cache = resolve_path(data.feature_cache, base)
    return data


__all__ = [
    "ConfigError",
    "DataConfig",
    "DataSource",
    "ModelConfig",
    "load_model_config",
    "build",
    "check_keys",
    "load_data_config",
    "read_yaml",
    "resolve_path",
]
