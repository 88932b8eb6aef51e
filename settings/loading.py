"""Reading a config file into the typed sections of `settings.sections`.

Loading is strict: an unknown or misspelt key is a `ConfigError` that names it and the file (and suggests
the closest known key), a value of the wrong type too. Relative paths in the file are resolved against the
file's folder, so a config can be run from anywhere.

This module is the one validator of config values (`fits`, `check_value`): the typed sections here, and the
`training` / `align` values that `settings.training` hands to argparse (`from_flags`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
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
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), known)}; "
                              f"known keys: {', '.join(known)}")


# What HfArgumentParser reads as a bool when argparse converts a string (settings.training's values).
FLAG_BOOLS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")


def describe(annotation: Any) -> str:
    """How an error message names a field type: "an integer", "true or false", "a list of strings", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:
            return "one of: " + ", ".join(str(m.value) for m in enums[0])
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of: " + ", ".join(map(repr, args))
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or annotation is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, str(annotation))


def fits(value: Any, annotation: Any, *, from_flags: bool = False) -> bool:
    """Whether a value read from YAML can be used for a field of this type. A dataclass field takes a mapping (its
    own keys are checked when it is built). With `from_flags` the value becomes an argparse default, which argparse
    converts when it is a string: "1e-4" (YAML reads 1e-4, without a dot, as a string) is then a number and "true"
    a bool; without it (the typed sections) only a number is a number and only true/false a bool."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # e.g. `SchedulerType | str`: the string must name a member
            return any(value in {m.value for m in e} for e in enums)
        return any(fits(value, a, from_flags=from_flags) for a in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0], from_flags=from_flags) for v in value) if args \
            else isinstance(value, list)
    if origin is dict or annotation is dict or dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool) or (from_flags and isinstance(value, str) and value.lower() in FLAG_BOOLS)
    if annotation in (int, float):
        if isinstance(value, bool):
            return False
        if isinstance(value, (int, float)) and (annotation is float or isinstance(value, int)):
            return True
        if not (from_flags and isinstance(value, str)):
            return False
        try:  # a string argparse converts
            annotation(value)
        except ValueError:
            return False
        return True
    if annotation is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    return True  # anything else (transformers' ParallelismConfig, ...) is left to its own class


def check_value(value: Any, annotation: Any, where: str, *, from_flags: bool = False) -> None:
    """Raise ConfigError "{where}: expected {type}, got {value}" unless `fits(value, annotation)`."""
    if not fits(value, annotation, from_flags=from_flags):
        raise ConfigError(f"{where}: expected {describe(annotation)}, got {value!r}")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """One section value, checked against its field's type (`check_value`) and typed: a dataclass built from its
    mapping, a number as a float, a string field's number as a string. A list is checked element by element, so
    that the message names the bad one (`data.sources[1]: ...`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or len(inner) > 1:
            check_value(value, annotation, where)
            return value
        return _convert(value, inner[0], where)
    if origin is list and args and isinstance(value, list):
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    check_value(value, annotation, where)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    if origin is dict or annotation is dict:
        return dict(value)
    if annotation is float:
        return float(value)
    if annotation is str:
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
