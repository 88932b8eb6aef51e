"""QWen v1 (Qwen-7B, Qwen-7B-Chat: `model_type` "qwen"), through the project's own implementation in `qwen/`,
which loads the official folders unchanged and computes what the official code computes."""

from __future__ import annotations

import os

import torch

from .base import TextFamily


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """QWenLMHeadModel of an official folder, strictly (every tensor present with its shape). Without `dtype`, the
    config's bf16/fp16 flags choose it (fp32 otherwise), as the official code does."""
    from qwen import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))


def load_tokenizer(folder: str | os.PathLike):
    from qwen import QWenTokenizer

    return QWenTokenizer.from_pretrained(folder)


FAMILY = TextFamily(
    name="qwen",
    model_types=("qwen",),
    # Qwen's own fine-tuning targets: the fused QKV, both output projections (attention and MLP) and the two MLP
    # input projections.
    lora_targets=("c_attn", "c_proj", "w1", "w2"),
    layers="transformer.h",
    embedding_modules=("wte", "lm_head"),
    load_model=load_model,
    load_tokenizer=load_tokenizer,
)
