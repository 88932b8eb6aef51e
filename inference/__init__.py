"""Answering with a trained checkpoint: loading it (`loading`: one LoadedCheckpoint with batched and streamed
answers) and generating (`generation`: prompts, conversations with images, the one generation path), used by
infer.py, webui.py, the evaluation and the demo."""

from .generation import (
    Prompt,
    PromptError,
    StopOnEvent,
    Turn,
    chat_prompt,
    fit_history,
    generate_answers,
    query_with_images,
)
from .loading import LoadedCheckpoint, find_checkpoint, load_checkpoint

__all__ = [
    "LoadedCheckpoint",
    "Prompt",
    "PromptError",
    "StopOnEvent",
    "Turn",
    "chat_prompt",
    "find_checkpoint",
    "fit_history",
    "generate_answers",
    "load_checkpoint",
    "query_with_images",
]
