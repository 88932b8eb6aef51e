"""Write a tiny, random CLIP checkpoint in exactly the openai/clip-vit-large-patch14 folder format.

The folder holds what the real one holds and nothing else: `config.json` of a full `CLIPModel`
(text and vision towers, projections), `model.safetensors` with the whole state dict under the
official key names (`vision_model.embeddings.patch_embedding.weight`, `text_model.…`,
`visual_projection.weight`, `text_projection.weight`, `logit_scale`), and the old-format
`preprocessor_config.json` (plain integers for `size`/`crop_size`, bicubic, OpenAI mean/std).
Tests, CI and the CPU demo use it wherever the real 1.7 GB checkpoint would go.

Weights come from our own seeded generator (visual.tiny_init), not from transformers' initialisers, so the
same seed gives byte-identical files whatever transformers does to its init code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from common.fileio import staged_folder
from common.safetensors_file import save_safetensors
from visual.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from visual.tiny_init import seeded_state_dict

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value the official preprocessor_config.json stores

# The text tower exists only so that the folder is a real CLIPModel checkpoint; the project never
# tokenizes text for CLIP, so its vocabulary is kept small (the official one has 49408 entries).
TINY_TEXT_VOCAB_SIZE = 1024
LOGIT_SCALE_INIT = 2.6592  # ln(1 / 0.07), as in the official config
POSITION_EMBEDDING_STD = 0.02  # CLIP's initializer_range


def tiny_clip_config(
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    projection_dim: int,
) -> CLIPConfig:
    """A full CLIPConfig (text + vision) with the official non-size settings (quick_gelu, eps 1e-5)."""
    text_config = CLIPTextConfig(
        vocab_size=TINY_TEXT_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        # The official openai/clip-* configs carry these ids (transformers' defaults differ).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=projection_dim,
        logit_scale_init_value=LOGIT_SCALE_INIT,
    )
    config.architectures = ["CLIPModel"]
    return config


def random_clip_state_dict(
    config: CLIPConfig, *, seed: int, position_embedding_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Every tensor of `CLIPModel(config).state_dict()`, drawn from a generator seeded with `seed`."""
    with torch.device("meta"):
        skeleton = CLIPModel(config)  # names, shapes and module types only; no memory, no RNG

    def special(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
        if name == "logit_scale":
            return torch.tensor(LOGIT_SCALE_INIT)
        if name.endswith("position_embedding.weight"):
            std = POSITION_EMBEDDING_STD
            if name.startswith("vision_model."):
                std *= position_embedding_scale
            return torch.randn(shape, generator=generator) * std
        if name.endswith("class_embedding"):
            return torch.randn(shape, generator=generator) * shape[0] ** -0.5
        if name.endswith("token_embedding.weight"):
            return torch.randn(shape, generator=generator) * POSITION_EMBEDDING_STD
        return None

    return seeded_state_dict(skeleton, seed=seed, special=special)


def preprocessor_config(image_size: int) -> dict:
    """The old (CLIPFeatureExtractor) format of openai/clip-vit-large-patch14, at `image_size`."""
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": BICUBIC,
        "size": image_size,
    }


def write_tiny_clip_checkpoint(
    path: str | os.PathLike,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    projection_dim: int = 32,
    seed: int = 0,
    position_embedding_scale: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a random CLIPModel checkpoint folder at `path` and return it.

    `position_embedding_scale` multiplies the vision tower's random position embeddings: with a
    random frozen tower, stronger position embeddings make "where is the object" visible to the
    model downstream. The folder is assembled in a temporary sibling and renamed into place at the
    end, so a crash never leaves a half-written checkpoint. An existing `path` is an error unless
    `overwrite=True`.
    """
    path = Path(path)
    if image_size % patch_size != 0:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    config = tiny_clip_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        projection_dim=projection_dim,
    )
    state_dict = random_clip_state_dict(config, seed=seed, position_embedding_scale=position_embedding_scale)

    with staged_folder(path) as staging:
        config.to_json_file(staging / "config.json")
        save_safetensors(state_dict, staging / "model.safetensors")
        with open(staging / "preprocessor_config.json", "w") as f:
            json.dump(preprocessor_config(image_size), f, indent=2)
            f.write("\n")
    return path
