"""QWen (Qwen-7B v1): configuration, model, tokenizer and chat format, compatible with the official checkpoints.

The model classes import transformers (seconds); they load on first use, so that tokenizer-only users
(process_image.py, the preflight) start fast.
"""

from importlib import import_module

from .chat_format import DEFAULT_SYSTEM, make_context, stop_token_ids
from .tokenization_qwen import QWenTokenizer

_LAZY = {
    "QWenConfig": ".configuration_qwen",
    "QWenLMHeadModel": ".modeling_qwen",
    "QWenModel": ".modeling_qwen",
    "QWenPreTrainedModel": ".modeling_qwen",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'qwen' has no attribute {name!r}")


__all__ = [
    "DEFAULT_SYSTEM",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "QWenTokenizer",
    "make_context",
    "stop_token_ids",
]
