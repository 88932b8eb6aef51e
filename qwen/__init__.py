"""QWen (Qwen-7B v1): configuration, model, tokenizer and chat format, compatible with the official checkpoints."""

from .chat_format import DEFAULT_SYSTEM, make_context, stop_token_ids
from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .tokenization_qwen import QWenTokenizer

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
