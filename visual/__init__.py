"""visual: the frozen CLIP vision tower, CLIP image preprocessing, image reading, tiny test checkpoints.

The tower and the checkpoint writer import transformers (seconds); they load on first use, so that
light users such as `process_image.py`, which only reads images, start fast.
"""

from importlib import import_module

from visual.image_io import ImageLoadError, load_image

_LAZY = {
    "CLIPVisionTower": "visual.clip_tower",
    "CheckpointError": "visual.clip_tower",
    "CLIPImagePreprocessor": "visual.image_processing",
    "write_tiny_clip_checkpoint": "visual.tiny_clip",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visual' has no attribute {name!r}")


__all__ = [
    "CLIPImagePreprocessor",
    "CLIPVisionTower",
    "CheckpointError",
    "ImageLoadError",
    "load_image",
    "write_tiny_clip_checkpoint",
]
