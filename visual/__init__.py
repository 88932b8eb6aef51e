"""visual: the frozen CLIP vision tower, CLIP image preprocessing, image reading, tiny test checkpoints."""

from visual.clip_tower import CheckpointError, CLIPVisionTower
from visual.image_io import ImageLoadError, load_image
from visual.image_processing import CLIPImagePreprocessor
from visual.tiny_clip import write_tiny_clip_checkpoint

__all__ = [
    "CLIPImagePreprocessor",
    "CLIPVisionTower",
    "CheckpointError",
    "ImageLoadError",
    "load_image",
    "write_tiny_clip_checkpoint",
]
