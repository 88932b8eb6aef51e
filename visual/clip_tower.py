"""The frozen CLIP vision tower: patch features of one hidden layer, CLS token dropped.

`CLIPVisionTower.from_pretrained(dir)` reads only the vision half (`vision_model.*` tensors) of a
local CLIP checkpoint folder, either a full `CLIPModel` such as openai/clip-vit-large-patch14 or a
saved `CLIPVisionModel`, with its weights in `model.safetensors` or in sharded safetensors with
`model.safetensors.index.json`. Loading is strict and loud (`visual.checkpoint`): every vision tensor the
model needs must be present with the right shape, and a vision tensor the model does not know is an error
too; the text tower and projection tensors are skipped silently. Pickled weights (`pytorch_model.bin`) are
never opened: the error says how to convert them once.

Only the layers whose output is used are kept: with `feature_layer=-2` (LLaVA's choice, the
penultimate layer) the last encoder layer is not even built, and `post_layernorm` never is (it
only normalises the pooled CLS output, which is not a patch feature). The result equals
`CLIPVisionModel(...)(pixel_values, output_hidden_states=True).hidden_states[feature_layer][:, 1:]`.

The tower is frozen (`visual.frozen_tower`). Its image processor is a shortest-edge resize and a centre crop
to image_size (`check_processor`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from .checkpoint import CheckpointError
from .frozen_tower import FrozenVisionTower
from .images import PREPROCESSOR_CONFIG, ImagePreprocessor


class CLIPVisionTower(FrozenVisionTower):
    """Frozen CLIP ViT: `forward(pixel_values [N, 3, S, S]) -> [N, num_patches, hidden_size]`, CLS dropped."""

    family = "clip"
    label = "CLIP"
    model_types = ("clip", "clip_vision_model")
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    feature_select_strategy = "default"

    @classmethod
    def num_image_tokens(cls, config: CLIPVisionConfig) -> int:
        """Feature rows per image, CLS dropped: the number of placeholder ids one image tag expands to
        ((image_size // patch_size) ** 2: 256 for ViT-L/14 at 224 px)."""
        if config.patch_size < 1 or config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        return (config.image_size // config.patch_size) ** 2

    @classmethod
    def check_processor(cls, folder: Path, config: CLIPVisionConfig, processor: ImagePreprocessor) -> None:
        """CLIP takes a centre crop of image_size x image_size."""
        size = config.image_size
        if not processor.do_center_crop:
            raise CheckpointError(
                f"CLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} has do_center_crop false, so the pixel size would "
                f"depend on each image's shape; the tower (config.json image_size) takes {size}x{size}"
            )
        height, width = processor.crop_size
        if (height, width) != (size, size):
            raise CheckpointError(
                f"CLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} crops images to {height}x{width}, but the tower "
                f"(config.json image_size) takes {size}x{size}; make crop_size {size}"
            )

    def _keep(self, vision_model: CLIPVisionModel) -> None:
        # post_layernorm is not kept: it only normalises the pooled CLS output.
        self.embeddings = vision_model.embeddings
        self.pre_layrnorm = vision_model.pre_layrnorm
        self.layers = vision_model.encoder.layers

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)  # [N, 1 + num_patches, hidden]
        hidden = self.pre_layrnorm(hidden)
        for layer in self.layers:
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
        return hidden[:, 1:]  # drop CLS: [N, num_patches, hidden]

