"""llm: the language backbones. One file per family (`qwen1`: QWen v1 through the project's own code; `qwen2`:
Qwen2 / Qwen2.5 / Qwen3 through transformers), each describing itself with a `TextFamily` (llm/base.py); the
family of a folder is read from its config.json `model_type`. Also the Qwen2 / Qwen3 tokenizer
(`qwen2_tokenizer`), tiny random checkpoints in the published folder layouts (`tiny`), and 4-bit NF4 loading
(QLoRA) that every family's `load_model` offers the same way (`quantization`).

Adding a family: a new file with its `FAMILY`, one entry in `FAMILIES`, and its tests (tests/llm/).
"""

from __future__ import annotations

import os

from common.lazy import lazy_exports

from . import qwen1, qwen2
from .base import ChatTokenizer, TextFamily, read_model_type

FAMILIES: tuple[TextFamily, ...] = (qwen1.FAMILY, qwen2.FAMILY)

__getattr__ = lazy_exports(__name__, {
    "Qwen2Tokenizer": ".qwen2_tokenizer",
    "write_tiny_qwen2_checkpoint": ".tiny",
    "write_qwen2_tokenizer_files": ".tiny",
})


def supported() -> str:
    return ", ".join(f"{t} ({f.name})" for f in FAMILIES for t in f.model_types)


def text_family(folder: str | os.PathLike) -> TextFamily:
    """The family of the language model in `folder`, from its config.json `model_type`; FileNotFoundError /
    ValueError naming the folder and what is supported."""
    model_type, _ = read_model_type(folder, "language model")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"{folder}: language model type {model_type!r} is not supported (supported: {supported()})")


def family_named(name: str) -> TextFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown language backbone family {name!r} (known: {', '.join(f.name for f in FAMILIES)})")


def load_tokenizer(folder: str | os.PathLike) -> ChatTokenizer:
    """The chat tokenizer of a language model folder, whatever its family."""
    return text_family(folder).load_tokenizer(folder)


def text_config(folder: str | os.PathLike) -> dict:
    """config.json of a language model folder (its family checked), without touching the weights."""
    text_family(folder)
    return read_model_type(folder, "language model")[1]


__all__ = ["FAMILIES", "ChatTokenizer", "Qwen2Tokenizer", "TextFamily", "family_named", "load_tokenizer",
           "text_config", "text_family", "write_qwen2_tokenizer_files", "write_tiny_qwen2_checkpoint"]
