"""load_config: a section value of the wrong type is one ConfigError naming the file, the section and the key;
values of the right type are typed (an integer where a number is asked becomes a float)."""

from __future__ import annotations

import pytest
import yaml

from settings import ConfigError, load_config

MODEL = {"llm_path": "llm", "vision_path": "clip"}
DATA = {"sources": [{"format": "aic", "annotations": "a.json", "image_dir": "img"}], "output": "out.jsonl"}


def write_config(tmp_path, **sections):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "data": DATA, **sections}))
    return path


@pytest.mark.parametrize("sections,expected", [
    ({"lora": {"lora_r": "x"}}, "lora.lora_r: expected an integer, got 'x'"),
    ({"lora": {"lora_r": 8.5}}, "lora.lora_r: expected an integer, got 8.5"),
    ({"lora": {"lora_alpha": True}}, "lora.lora_alpha: expected an integer, got True"),
    ({"lora": {"lora_dropout": "0.1"}}, "lora.lora_dropout: expected a number, got '0.1'"),
    ({"lora": {"train_embeddings": "yes"}}, "lora.train_embeddings: expected true or false, got 'yes'"),
    ({"lora": {"lora_target_modules": "c_attn"}}, "lora.lora_target_modules: expected a list"),
    ({"model": {**MODEL, "system_prompt": ["a"]}}, "model.system_prompt: expected a string, got ['a']"),
    ({"data": {**DATA, "sources": {"format": "aic"}}}, "data.sources: expected a list"),
    ({"data": {**DATA, "sources": ["aic"]}}, "data.sources[0]: expected a mapping, got 'aic'"),
    ({"data": {**DATA, "sources": [{"format": "aic"}]}}, "data.sources[0]: missing required key 'annotations'"),
    ({"demo": {"qwen": [1]}}, "demo.qwen: expected a mapping, got [1]"),
])
def test_a_wrong_typed_section_value_names_the_key_and_the_file(tmp_path, sections, expected):
    path = write_config(tmp_path, **sections)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {expected}")


def test_values_are_typed(tmp_path):
    config = load_config(write_config(tmp_path, lora={"lora_dropout": 0, "lora_target_modules": ["c_attn"]},
                                      model={**MODEL, "system_prompt": 7, "projector_path": None}))
    assert config.lora.lora_dropout == 0.0 and isinstance(config.lora.lora_dropout, float)
    assert config.lora.lora_target_modules == ["c_attn"]
    assert config.model.system_prompt == "7" and config.model.projector_path is None
    assert config.data.sources[0].image_dir == str(tmp_path / "img") and config.data.sources[0].limit is None


def test_demo_defaults_are_the_demo_config_of_the_checkout():
    """DemoConfig's defaults are config.yaml's `demo` section, key by key, and that section sets every field: a
    config that leaves a key out gets the demo README describes (the defaults once held a 2-layer tower and a
    fifth of the pretraining)."""
    from dataclasses import fields
    from pathlib import Path

    import yaml

    from settings.sections import DemoConfig

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "config.yaml").read_text(encoding="utf-8"))["demo"]
    defaults = DemoConfig()
    differ = {f.name: (getattr(defaults, f.name), shipped.get(f.name, "(not set)")) for f in fields(DemoConfig)
              if shipped.get(f.name, "(not set)") != getattr(defaults, f.name)}
    assert not differ, f"DemoConfig default vs config.yaml: {differ}"
