"""The frozen SigLIP vision tower: every patch's features from one hidden layer (SigLIP has no CLS token).

`SiglipVisionTower.from_pretrained(dir)` reads only the vision half (`vision_model.*` tensors) of a local
SigLIP checkpoint folder: a full `SiglipModel` as google/siglip-so400m-patch14-384 publishes it (config.json
with model_type "siglip", text_config and vision_config; the text tower, `logit_scale` and `logit_bias` are
skipped) or a saved `SiglipVisionModel` (model_type "siglip_vision_model"), weights in `model.safetensors` or
shards with `model.safetensors.index.json`. Loading is as strict and loud as the CLIP tower's
(`visual.checkpoint`): the MAP pooling head (`vision_model.head.*`) must be in the file when the config says
`vision_use_head` (the default), though the tower never runs it.

Only the layers whose output is used are built: neither `post_layernorm` nor the head is (transformers'
`hidden_states` are taken before them). The result equals
`SiglipVisionModel(...)(pixel_values, output_hidden_states=True).hidden_states[feature_layer]`: all
(image_size // patch_size) ** 2 patches, 729 for so400m at 384 px. 384 is not a multiple of 14: the patch
convolution (stride 14, no padding) drops the last 6 pixel rows and columns, so the count floors.

Its image processor resizes every image to exactly image_size x image_size, aspect ratio not kept, no crop,
mean and std 0.5 (`check_processor`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from .checkpoint import CheckpointError
from .frozen_tower import FrozenVisionTower
from .images import PREPROCESSOR_CONFIG, ImagePreprocessor


class SiglipVisionTower(FrozenVisionTower):
    """Frozen SigLIP ViT: `forward(pixel_values [N, 3, S, S]) -> [N, (S // patch) ** 2, hidden_size]`."""

    family = "siglip"
    label = "SigLIP"
    model_types = ("siglip", "siglip_vision_model")
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    feature_select_strategy = "full"

    @classmethod
    def num_image_tokens(cls, config: SiglipVisionConfig) -> int:
        """Feature rows per image, every patch: (image_size // patch_size) ** 2 (729 for so400m-patch14-384)."""
        image_size, patch_size = config.image_size, config.patch_size
        if not (isinstance(image_size, int) and isinstance(patch_size, int)) or not 1 <= patch_size <= image_size:
            raise ValueError(
                f"image_size {image_size!r} and patch_size {patch_size!r} must be integers with "
                f"1 <= patch_size <= image_size"
            )
        return (image_size // patch_size) ** 2

    @classmethod
    def check_processor(cls, folder: Path, config: SiglipVisionConfig, processor: ImagePreprocessor) -> None:
        """SigLIP takes each image resized to exactly image_size x image_size."""
        size = config.image_size
        fix = f'make size {{"height": {size}, "width": {size}}}, as google/siglip-* publish it'
        if not (processor.do_resize and processor.resizes_exactly):
            how = ("does not resize" if not processor.do_resize
                   else "resizes the shortest edge, keeping the aspect ratio")
            raise CheckpointError(
                f"SigLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} {how}; the tower takes every image resized to "
                f"{size}x{size} (config.json image_size): {fix}"
            )
        height, width = processor.output_size
        if (height, width) != (size, size):
            raise CheckpointError(
                f"SigLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} makes images {height}x{width}, but the tower "
                f"(config.json image_size) takes {size}x{size}; {fix}"
            )

    @classmethod
    def feature_model_config(cls, config: SiglipVisionConfig) -> SiglipVisionConfig:
        """`config` without the MAP pooling head (`vision_use_head` false): it pools after post_layernorm, which
        no feature layer passes through."""
        without_head = copy.deepcopy(config)
        without_head.vision_use_head = False
        return without_head

    def _keep(self, vision_model: SiglipVisionModel) -> None:
        # post_layernorm is not kept: hidden_states are taken before it.
        self.embeddings = vision_model.embeddings
        self.layers = vision_model.encoder.layers

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)  # patches + position embeddings: [N, num_patches, hidden]
        for layer in self.layers:
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
        return hidden  # [N, num_patches, hidden]
