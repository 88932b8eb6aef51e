"""Reading a config file into the typed sections of `settings.sections`.

Loading is strict: an unknown or misspelt key is a `ConfigError` that names it and the file (and suggests
the closest known key), a value of the wrong type too. Relative paths in the file are resolved against the
file's folder, so a config can be run from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .sections import DataConfig, DemoConfig, LoraConfig, ModelConfig


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the key and the file."""


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


SECTIONS = ("demo", "model", "data", "lora", "training", "align")
# Path-valued keys of each section, resolved against the config file's folder.
PATH_KEYS = {
    "demo": ("workdir",),
    "model": ("llm_path", "vision_path", "projector_path"),
    "data": ("output", "val_output", "feature_cache"),
    "training": ("output_dir", "logging_dir", "deepspeed"),
    "align": ("output_dir", "logging_dir", "deepspeed"),
}


@dataclass
class Config:
    """A whole config file. Sections the file does not have are None (lora: its defaults); `training` and `align`
    stay mappings here, typed by `settings.training` (it needs transformers, which process_image.py does not)."""

    path: Path
    demo: DemoConfig | None = None
    model: ModelConfig | None = None
    data: DataConfig | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: dict[str, Any] = field(default_factory=dict)
    align: dict[str, Any] | None = None  # the align stage's training values and sources (settings.training)

    def require(self, section: str):
        value = getattr(self, section)
        if value is None or (section == "training" and not value):
            raise ConfigError(f"{self.path}: no {section!r} section" + (
                ": this config is not the demo" if section == "demo" else ""))
        return value


def load_config(path: str | os.PathLike, sections: tuple[str, ...] = SECTIONS) -> Config:
    """The config file at `path`: its `sections` typed and with their paths resolved (the others are left
    unread: process_image.py reads only `data`, so a half-written training section does not stop it)."""
    path = Path(path)
    raw = read_yaml(path)
    check_keys(raw, list(SECTIONS), str(path))
    base = path.resolve().parent
    config = Config(path=path)
    for name, cls in (("demo", DemoConfig), ("model", ModelConfig), ("data", DataConfig), ("lora", LoraConfig)):
        if name in raw and name in sections:
            setattr(config, name, build(cls, raw[name] or {}, f"{path}: {name}"))
    training = raw.get("training") or {} if "training" in sections else {}
    if not isinstance(training, dict):
        raise ConfigError(f"{path}: training: expected a mapping, got {training!r}")
    config.training = dict(training)
    if "align" in raw and "align" in sections:
        align = raw["align"] or {}
        if not isinstance(align, dict):
            raise ConfigError(f"{path}: align: expected a mapping, got {align!r}")
        config.align = dict(align)
    for name, keys in PATH_KEYS.items():
        section = getattr(config, name)
        if not section:
            continue
        for key in keys:
            if isinstance(section, dict):
                if isinstance(section.get(key), str):
                    section[key] = resolve_path(section[key], base)
            else:
                setattr(section, key, resolve_path(getattr(section, key), base))
    if config.data is not None:
        for src in config.data.sources:
            src.annotations = resolve_path(src.annotations, base)
            src.image_dir = resolve_path(src.image_dir, base)
    return config
