"""Build the multimodal model from its two base folders, whatever their families: the language backbone's from
its config.json `model_type` (llm/), the vision tower's from its own (visual/). `build_vlm` loads both strictly
(the LLM's linear weights in 4-bit NF4 with `quantization="nf4"`, llm/quantization.py; the tower never) and adds
a freshly initialised fp32 projector; `vlm_config_for` describes the result for a bundle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llm import text_family
from llm.quantization import NONE, quantization_of
from qwen.chat_format import DEFAULT_SYSTEM
from visual import load_vision_tower

from .config import TextBackbone, VisionBackbone, VLMConfig
from .modeling_vlm import VisionLanguageModel


def build_vlm(
    llm_path: str | os.PathLike,
    vision_path: str | os.PathLike,
    *,
    vision_feature_layer: int = -2,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    quantization: str = NONE,
) -> VisionLanguageModel:
    """The language model (strictly loaded from its folder) + the frozen vision tower + a fresh fp32 projector.

    `tokenizer` (the LLM folder's, when the caller has it) gives the image placeholder id; else it is loaded.
    `quantization`: "none", or "nf4" for the LLM's linear weights in 4-bit (QLoRA; needs bitsandbytes).
    """
    family = text_family(llm_path)
    tower = load_vision_tower(vision_path, feature_layer=vision_feature_layer, dtype=dtype)
    language_model = family.load_model(llm_path, dtype=dtype, quantization=quantization)
    tokenizer = tokenizer if tokenizer is not None else family.load_tokenizer(llm_path)
    model = VisionLanguageModel(language_model, tower, image_token_id=tokenizer.image_token_id)
    model.text_family = family  # what LoRA and the bundle need to know of the LLM's family
    model.image_token = tokenizer.image_token
    return model


def vlm_config_for(model: VisionLanguageModel, llm_path, vision_path, system_prompt: str = DEFAULT_SYSTEM) -> VLMConfig:
    """The bundle description of a model built by `build_vlm` from these folders."""
    tower = model.vision_tower
    return VLMConfig(
        text=TextBackbone(family=model.text_family.name, path=str(Path(llm_path).resolve()),
                          hidden_size=model.config.hidden_size, quantization=quantization_of(model.language_model)),
        vision=VisionBackbone(family=tower.family, path=str(Path(vision_path).resolve()),
                              feature_layer=tower.feature_layer, hidden_size=tower.hidden_size,
                              num_image_tokens=tower.num_patches),
        image_token=model.image_token,
        image_token_id=model.image_token_id,
        system_prompt=system_prompt,
    )
