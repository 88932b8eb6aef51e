"""Which vision tower a checkpoint folder holds, read from its config.json `model_type`, and the calls that work
on any of them.

    clip, clip_vision_model       -> CLIPVisionTower   (visual/clip_tower.py)
    siglip, siglip_vision_model   -> SiglipVisionTower (visual/siglip_tower.py)

A third family is one new file with a `FrozenVisionTower` subclass (see visual/frozen_tower.py) and one entry in
`TOWERS`. Callers never ask which family a folder is to decide what to do: they call these functions, and the
tower class answers (its image-token count, its image processor, its checkpoint check).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, TensorLocations, read_model_type
from .clip_tower import CLIPVisionTower
from .frozen_tower import FrozenVisionTower
from .images import ImagePreprocessor
from .siglip_tower import SiglipVisionTower

TOWERS: tuple[type[FrozenVisionTower], ...] = (CLIPVisionTower, SiglipVisionTower)


def supported_model_types() -> list[str]:
    """Every config.json model_type a vision folder may have."""
    return [model_type for tower in TOWERS for model_type in tower.model_types]


def vision_tower_class(folder: str | os.PathLike) -> type[FrozenVisionTower]:
    """The tower class for the checkpoint folder, from its config.json `model_type`. Raises CheckpointError naming
    the folder, the model_type found and the supported ones."""
    model_type = read_model_type(Path(folder), "vision")
    for tower in TOWERS:
        if model_type in tower.model_types:
            return tower
    raise CheckpointError(
        f"vision checkpoint {folder}: config.json has model_type {model_type!r}, which is not a supported vision "
        f"tower (supported: {', '.join(supported_model_types())})"
    )


def vision_family(folder: str | os.PathLike) -> str:
    """"clip" or "siglip": the family of the tower in the checkpoint folder."""
    return vision_tower_class(folder).family


def load_vision_tower(
    folder: str | os.PathLike, feature_layer: int = -2, dtype: torch.dtype | None = None
) -> FrozenVisionTower:
    """The frozen tower of the checkpoint folder, whatever its family (see each tower's `from_pretrained`)."""
    return vision_tower_class(folder).from_pretrained(folder, feature_layer=feature_layer, dtype=dtype)


def inspect_vision_checkpoint(folder: str | os.PathLike) -> tuple[object, list[Path], TensorLocations]:
    """Check the checkpoint folder without reading a tensor: -> (vision config, weight files, vision tensor
    locations: name without `vision_model.` -> (file, shape)). Raises CheckpointError naming the problem."""
    return vision_tower_class(folder).inspect_checkpoint(folder)


def vision_config(folder: str | os.PathLike):
    """The vision config (CLIPVisionConfig, SiglipVisionConfig) of the checkpoint folder; no weight is read."""
    return vision_tower_class(folder).vision_config(folder)


def load_image_preprocessor(folder: str | os.PathLike) -> ImagePreprocessor:
    """The checkpoint folder's own image processor (its preprocessor_config.json), checked to fit its tower."""
    return vision_tower_class(folder).image_preprocessor(folder)


def tower_class_for_config(config) -> type[FrozenVisionTower]:
    """The tower class whose vision config `config` is (a CLIPVisionConfig, a SiglipVisionConfig, ...)."""
    for tower in TOWERS:
        if isinstance(config, tower.config_class):
            return tower
    raise ValueError(
        f"{type(config).__name__} is not the vision config of a supported tower "
        f"({', '.join(tower.config_class.__name__ for tower in TOWERS)})"
    )


def num_image_tokens(config) -> int:
    """Feature rows per image of the tower with this vision config: the placeholder ids one image tag expands to
    (256 for CLIP ViT-L/14 at 224 px, 729 for SigLIP so400m-patch14-384). The one place this is decided."""
    return tower_class_for_config(config).num_image_tokens(config)
