"""Answering with a trained checkpoint: loading it (`loading`) and generating (`generation`): the one path
used by infer.py, the evaluation, the demo and the web UI."""

from .generation import IMAGE_MARK, Prompt, PromptError, generate_answers, query_with_images
from .loading import LoadedCheckpoint, latest_checkpoint, load_checkpoint

__all__ = [
    "IMAGE_MARK",
    "LoadedCheckpoint",
    "Prompt",
    "PromptError",
    "generate_answers",
    "latest_checkpoint",
    "load_checkpoint",
    "query_with_images",
]
