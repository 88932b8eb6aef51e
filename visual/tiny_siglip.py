"""Write a tiny, random SigLIP checkpoint in the google/siglip-so400m-patch14-384 folder format.

The folder holds what the real one holds: `config.json` of a full `SiglipModel` written as the published one is
(model_type "siglip", `text_config` and `vision_config` holding only their sizes and model types, everything
else transformers' defaults: gelu_pytorch_tanh, LayerNorm eps 1e-6, the MAP pooling head), the whole state dict
under the official key names (`vision_model.embeddings.patch_embedding.weight`, `vision_model.encoder.layers.N.*`,
`vision_model.post_layernorm.*`, `vision_model.head.*`, `text_model.*`, `logit_scale`, `logit_bias`) in
`model.safetensors`, or, with `max_shard_size`, in shards `model-0000i-of-0000n.safetensors` listed by
`model.safetensors.index.json`; and `preprocessor_config.json` as published (resize to exactly image_size, no
crop, bicubic, mean and std 0.5). Tests and CPU runs use it wherever the real 3.5 GB checkpoint would go.

Weights come from our own seeded generator (visual.tiny_init); the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import SiglipConfig, SiglipModel

from common.fileio import staged_folder, write_json
from common.safetensors_file import save_safetensors
from visual.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX
from visual.images import PREPROCESSOR_CONFIG, SIGLIP_MEAN, SIGLIP_STD
from visual.tiny_init import seeded_state_dict

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value the published preprocessor_config.json stores
# The text tower exists only so that the folder is a real SiglipModel checkpoint; the project never tokenizes
# text for SigLIP, so its vocabulary is kept small (the published one has 32000 entries).
TINY_TEXT_VOCAB_SIZE = 1024
# SigLIP's initial logit scale and bias (the paper: t' = log 10, b = -10).
LOGIT_SCALE_INIT = math.log(10.0)
LOGIT_BIAS_INIT = -10.0
EMBEDDING_STD = 0.02
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


def tiny_siglip_config(
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
) -> dict:
    """config.json of a SiglipModel in the published form: sizes and model types, nothing else."""
    sizes = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
    }
    return {
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {**sizes, "model_type": "siglip_text_model", "vocab_size": TINY_TEXT_VOCAB_SIZE},
        "torch_dtype": "float32",
        "vision_config": {
            **sizes,
            "image_size": image_size,
            "model_type": "siglip_vision_model",
            "patch_size": patch_size,
        },
    }


def random_siglip_state_dict(
    config: dict, *, seed: int, position_embedding_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Every tensor of `SiglipModel(config).state_dict()`, drawn from a generator seeded with `seed`."""
    with torch.device("meta"):
        skeleton = SiglipModel(SiglipConfig.from_dict(config))  # names, shapes and module types only

    def special(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
        if name == "logit_scale":
            return torch.full(shape, LOGIT_SCALE_INIT)
        if name == "logit_bias":
            return torch.full(shape, LOGIT_BIAS_INIT)
        if name.endswith("in_proj_bias"):  # the pooling head's nn.MultiheadAttention
            return torch.zeros(shape)
        if name.endswith("head.probe"):  # [1, 1, hidden]: the pooling query
            return torch.randn(shape, generator=generator) * shape[-1] ** -0.5
        if name.endswith("position_embedding.weight"):
            std = EMBEDDING_STD * (position_embedding_scale if name.startswith("vision_model.") else 1.0)
            return torch.randn(shape, generator=generator) * std
        if name.endswith("token_embedding.weight"):
            return torch.randn(shape, generator=generator) * EMBEDDING_STD
        return None

    return seeded_state_dict(skeleton, seed=seed, special=special)


def preprocessor_config(image_size: int) -> dict:
    """google/siglip-so400m-patch14-384's preprocessor_config.json, at `image_size`."""
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(SIGLIP_MEAN),
        "image_processor_type": "SiglipImageProcessor",
        "image_std": list(SIGLIP_STD),
        "processor_class": "SiglipProcessor",
        "resample": BICUBIC,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }


def shard_names(state_dict: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Names in sorted order, cut into groups of at most `max_shard_size` bytes (a larger tensor alone)."""
    groups, current, used = [], [], 0
    for name in sorted(state_dict):
        size = state_dict[name].numel() * state_dict[name].element_size()
        if current and used + size > max_shard_size:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    groups.append(current)
    return groups


def write_weights(folder: Path, state_dict: dict[str, torch.Tensor], max_shard_size: int | None) -> None:
    """`model.safetensors`, or shards + `model.safetensors.index.json` when `max_shard_size` cuts it."""
    groups = shard_names(state_dict, max_shard_size) if max_shard_size else [sorted(state_dict)]
    if len(groups) == 1:
        save_safetensors(state_dict, folder / SAFETENSORS_FILE)
        return
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        shard = SHARD_NAME.format(i, len(groups))
        save_safetensors({name: state_dict[name] for name in names}, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    write_json(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_tiny_siglip_checkpoint(
    path: str | os.PathLike,
    *,
    image_size: int = 56,
    patch_size: int = 14,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    seed: int = 0,
    position_embedding_scale: float = 1.0,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random SiglipModel checkpoint folder at `path` and return it.

    `image_size` need not be a multiple of `patch_size` (so400m: 384 px, patch 14); the tower floors.
    `position_embedding_scale` multiplies the vision tower's random position embeddings (see
    visual.tiny_clip). `max_shard_size` (bytes) writes the weights as shards of at most that size plus the index.
    The folder is assembled in a temporary sibling and renamed into place at the end, so a crash never leaves a
    half-written checkpoint. An existing `path` is an error unless `overwrite=True`.
    """
    path = Path(path)
    if not 1 <= patch_size <= image_size:
        raise ValueError(f"patch_size {patch_size} must be between 1 and image_size {image_size}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    config = tiny_siglip_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
    )
    state_dict = random_siglip_state_dict(config, seed=seed, position_embedding_scale=position_embedding_scale)

    with staged_folder(path) as staging:
        write_json(staging / CONFIG_FILE, config)
        write_weights(staging, state_dict, max_shard_size)
        write_json(staging / PREPROCESSOR_CONFIG, preprocessor_config(image_size))
    return path
