"""QWen (Qwen-7B v1): configuration, model, tokenizer and chat format, compatible with the official checkpoints.

The model classes import transformers (seconds); they load on first use, so that tokenizer-only users
(process_image.py, the preflight) start fast.
"""

from common.lazy import lazy_exports

from .chat_format import DEFAULT_SYSTEM, make_context
from .tokenization_qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenTokenizer

__getattr__ = lazy_exports(__name__, {
    "QWenConfig": ".configuration_qwen",
    "QWenLMHeadModel": ".modeling_qwen",
    "QWenModel": ".modeling_qwen",
    "QWenPreTrainedModel": ".modeling_qwen",
})

__all__ = [
    "DEFAULT_SYSTEM",
    "IMAGE_TAG",
    "IMAGE_TOKEN_ID",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "QWenTokenizer",
    "make_context",
]
