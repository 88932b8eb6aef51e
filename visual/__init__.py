"""visual: image reading and CLIP preprocessing (`images`), the frozen CLIP vision tower (`clip_tower`), tiny
test checkpoints in the official layout (`tiny_clip`).

The tower and the checkpoint writer import transformers (seconds); they load on first use, so that light
users such as `process_image.py`, which only reads images, start fast.
"""

from common.lazy import lazy_exports

from .images import CLIPImagePreprocessor, ImageLoadError, load_image

__getattr__ = lazy_exports(__name__, {
    "CLIPVisionTower": ".clip_tower",
    "CheckpointError": ".clip_tower",
    "num_image_tokens": ".clip_tower",
    "vision_config": ".clip_tower",
    "write_tiny_clip_checkpoint": ".tiny_clip",
})

__all__ = [
    "CLIPImagePreprocessor",
    "CLIPVisionTower",
    "CheckpointError",
    "ImageLoadError",
    "load_image",
    "num_image_tokens",
    "vision_config",
    "write_tiny_clip_checkpoint",
]
