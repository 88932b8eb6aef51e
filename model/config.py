"""The model description saved in every checkpoint bundle (`vlm_config.json`), like transformers' `LlavaConfig`:
the text backbone, the vision backbone (with its feature layer and image-token count), the projector, the image
token, and the system prompt it was trained with. `model.load_vlm(folder)` rebuilds exactly the trained model
from it.

    {"format": "vlm-bundle/2",
     "text":   {"family": "qwen2", "path": "/models/Qwen2.5-7B-Instruct", "hidden_size": 3584, "quantization": "none"},
     "vision": {"family": "siglip", "path": "/models/siglip-so400m-patch14-384", "feature_layer": -2,
                "hidden_size": 1152, "num_image_tokens": 729},
     "projector": "mlp2x_gelu", "image_token": "<|image_pad|>", "image_token_id": 151655,
     "system_prompt": "You are a helpful assistant.", "merged": false, "adapter": true}

Paths are absolute, or relative to the bundle folder ("." for a merged export). `text.quantization` is how the
LLM's linear weights were held in training ("none", or "nf4": 4-bit QLoRA, llm/quantization.py); loading the
bundle holds them so again unless told otherwise (absent in older bundles: "none"). A merged export has "none":
its weights are the original ones with the LoRA folded in. Bundles of the first format
(`qwen-vl-bundle/1`: flat keys, always QWen v1 + CLIP) are read as what they are.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.fileio import write_json
from llm.quantization import NONE, QUANTIZATIONS
from qwen.chat_format import DEFAULT_SYSTEM
from qwen.tokenization_qwen import IMAGE_TAG, IMAGE_TOKEN_ID
from settings import ConfigError, build

BUNDLE_CONFIG_FILE = "vlm_config.json"
BUNDLE_FORMAT = "vlm-bundle/2"
FIRST_FORMAT = "qwen-vl-bundle/1"
PROJECTOR_TYPE = "mlp2x_gelu"  # Linear -> GELU -> Linear (model.modeling_vlm.Projector)


@dataclass
class TextBackbone:
    family: str  # llm.TextFamily.name: "qwen" (QWen v1), "qwen2" (Qwen2 / Qwen2.5 / Qwen3)
    path: str
    hidden_size: int
    quantization: str = NONE  # the LLM's linear weights in training: llm.quantization.QUANTIZATIONS


@dataclass
class VisionBackbone:
    family: str  # visual tower family: "clip", "siglip"
    path: str
    feature_layer: int  # hidden_states index of the layer whose patch features are used
    hidden_size: int
    num_image_tokens: int  # feature rows per image: the placeholders one image expands to


@dataclass
class VLMConfig:
    text: TextBackbone
    vision: VisionBackbone
    image_token: str  # the LLM's reserved placeholder token
    image_token_id: int
    system_prompt: str = DEFAULT_SYSTEM
    projector: str = PROJECTOR_TYPE
    merged: bool = False  # True: the LLM's weights with the LoRA folded in live in the folder itself
    adapter: bool = False  # True: the folder holds a LoRA adapter (adapter_config.json + adapter_model.safetensors)
    format: str = BUNDLE_FORMAT

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / BUNDLE_CONFIG_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> VLMConfig:
        path = Path(folder) / BUNDLE_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint bundle: no {BUNDLE_CONFIG_FILE}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        if raw.get("format") == FIRST_FORMAT:
            raw = upgrade_first_format(raw, str(path))
        config = build(cls, raw, str(path))
        if config.format != BUNDLE_FORMAT:
            raise ConfigError(f"{path}: unsupported bundle format {config.format!r} (this version reads "
                              f"{BUNDLE_FORMAT!r} and {FIRST_FORMAT!r}; a newer version of the project wrote it?)")
        if config.text.quantization not in QUANTIZATIONS:
            raise ConfigError(f"{path}: text.quantization {config.text.quantization!r} is not one of: "
                              f"{', '.join(QUANTIZATIONS)}")
        if config.projector != PROJECTOR_TYPE:
            raise ConfigError(f"{path}: projector {config.projector!r} is not supported (only {PROJECTOR_TYPE!r})")
        return config

    def resolve(self, folder: str | Path) -> tuple[str, str]:
        """Absolute base-model folders (text, vision); relative ones are taken from the bundle folder."""
        return tuple(str(p if Path(p).is_absolute() else (Path(folder) / p).resolve())
                     for p in (self.text.path, self.vision.path))

    def identity(self) -> dict[str, Any]:
        """What must agree for a bundle's trainable weights to fit a model (resuming, the best checkpoint)."""
        return {"text.family": self.text.family, "text.path": self.text.path, "text.hidden_size": self.text.hidden_size,
                "text.quantization": self.text.quantization, **self.projector_input(), "vision.path": self.vision.path}

    def projector_input(self) -> dict[str, Any]:
        """What a projector's weights mean: its input (which tower, which layer, how many rows) and its output (the
        LLM family and width it feeds). The base folders may differ (another machine)."""
        return {"text.family": self.text.family,
                "vision.family": self.vision.family, "vision.feature_layer": self.vision.feature_layer,
                "vision.hidden_size": self.vision.hidden_size, "vision.num_image_tokens": self.vision.num_image_tokens,
                "text.hidden_size": self.text.hidden_size, "image_token_id": self.image_token_id}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: saved vs now` for each key of `now` whose values differ."""
    return [f"{key}: checkpoint {saved.get(key)!r} vs now {now[key]!r}" for key in now if saved.get(key) != now[key]]


def upgrade_first_format(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A `qwen-vl-bundle/1` config (QWen v1 + CLIP, flat keys) as the current format says the same model."""
    keys = {"llm_path", "vision_path", "vision_feature_layer", "num_image_tokens", "vision_hidden_size",
            "llm_hidden_size", "image_token_id", "system_prompt", "merged", "adapter", "format"}
    if unknown := sorted(set(raw) - keys):
        raise ConfigError(f"{where}: unknown key(s) {unknown} for a {FIRST_FORMAT} bundle")
    try:
        upgraded = {
            "text": {"family": "qwen", "path": raw["llm_path"], "hidden_size": raw["llm_hidden_size"]},
            "vision": {"family": "clip", "path": raw["vision_path"], "feature_layer": raw["vision_feature_layer"],
                       "hidden_size": raw["vision_hidden_size"], "num_image_tokens": raw["num_image_tokens"]},
            "image_token": IMAGE_TAG,  # the only image token of that format
            "image_token_id": raw.get("image_token_id", IMAGE_TOKEN_ID),
        }
    except KeyError as e:
        raise ConfigError(f"{where}: missing required key {e.args[0]!r}") from None
    upgraded.update({k: raw[k] for k in ("system_prompt", "merged", "adapter") if k in raw})
    return upgraded
