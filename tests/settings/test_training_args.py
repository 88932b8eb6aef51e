"""train.py's arguments: a wrong-typed config value names the key and the file; a bad or abbreviated flag is one
ConfigError, not a usage dump."""

from __future__ import annotations

import pytest
import yaml

from settings import ConfigError
from settings.training import parse_train_args


def write_config(tmp_path, **training):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"llm_path": "llm", "vision_path": "clip"},
                                    "training": {"output_dir": "out", "report_to": "none", **training}}))
    return path


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", "fast", "expected a number, got 'fast'"),
    ("per_device_train_batch_size", 2.5, "expected an integer, got 2.5"),
    ("max_steps", True, "expected an integer, got True"),
    ("bf16", "maybe", "expected true or false, got 'maybe'"),
    ("lr_scheduler_type", "cosinus", "expected one of: linear, cosine"),
    ("report_to", {"tensorboard": True}, "expected a string or a list of strings, got {'tensorboard': True}"),
    ("label_names", "labels", "got 'labels'"),
])
def test_a_wrong_typed_config_value_names_the_key_and_the_file(tmp_path, key, value, expected):
    path = write_config(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as e:
        parse_train_args(["--config", str(path)])
    message = str(e.value)
    assert message.startswith(f"{path}: training.{key}: ") and expected in message
    assert "\n" not in message


def test_values_argparse_converts_are_accepted(tmp_path):
    # YAML reads 1e-4 (no dot) as a string; argparse converts it, as it does "true" for a bool
    path = write_config(tmp_path, learning_rate="1e-4", use_cpu="true", report_to=["none"], warmup_steps=0.03)
    args = parse_train_args(["--config", str(path)]).args
    assert args.learning_rate == 1e-4 and args.use_cpu is True and args.warmup_steps == 0.03


@pytest.mark.parametrize("argv,expected", [
    (["--learning_rate", "abc"], "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
    (["--learning_rat", "3"], "unknown command-line arguments: --learning_rat 3"),  # never an abbreviation
])
def test_a_bad_flag_is_one_config_error(tmp_path, argv, expected):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(")):
        parse_train_args(["--config", str(path), *argv])
