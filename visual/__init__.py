"""visual: image reading and each tower's preprocessing (`images`), the frozen vision towers (`clip_tower`,
`siglip_tower`, sharing `frozen_tower` and the checkpoint reading of `checkpoint`), the registry that picks a
folder's tower from its config.json (`towers`), tiny test checkpoints in the official layouts (`tiny_clip`,
`tiny_siglip`).

The towers and the checkpoint writers import transformers (seconds); they load on first use, so that light
users such as `process_image.py`, which only reads images, start fast.
"""

from common.lazy import lazy_exports

from .images import ImageLoadError, ImagePreprocessor, load_image

__getattr__ = lazy_exports(__name__, {
    "CheckpointError": ".checkpoint",
    "CLIPVisionTower": ".clip_tower",
    "FrozenVisionTower": ".frozen_tower",
    "SiglipVisionTower": ".siglip_tower",
    "inspect_vision_checkpoint": ".towers",
    "load_image_preprocessor": ".towers",
    "load_vision_tower": ".towers",
    "num_image_tokens": ".towers",
    "vision_config": ".towers",
    "vision_family": ".towers",
    "write_tiny_clip_checkpoint": ".tiny_clip",
    "write_tiny_siglip_checkpoint": ".tiny_siglip",
})

__all__ = [
    "CLIPVisionTower",
    "CheckpointError",
    "FrozenVisionTower",
    "ImageLoadError",
    "ImagePreprocessor",
    "SiglipVisionTower",
    "inspect_vision_checkpoint",
    "load_image",
    "load_image_preprocessor",
    "load_vision_tower",
    "num_image_tokens",
    "vision_config",
    "vision_family",
    "write_tiny_clip_checkpoint",
    "write_tiny_siglip_checkpoint",
]
