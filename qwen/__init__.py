"""QWen (Qwen-7B v1): configuration, model, tokenizer and chat format, compatible with the official checkpoints."""

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel"]
