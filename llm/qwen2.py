"""Qwen2, Qwen2.5 and Qwen3 (`model_type` "qwen2" / "qwen3"), through transformers' own classes, from the
folders as published: config.json, sharded safetensors with their index, tokenizer.json with tokenizer_config.json.
The image placeholder is the tokenizer's reserved `<|image_pad|>` (llm/qwen2_tokenizer.py). The transformers-native
export writes the model as it is: its own config, its own tensors, the folder's tokenizer.json."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .base import TextFamily, TransformersText
from .quantization import check_quantized_layers, from_pretrained_kwargs

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None, quantization: str = "none"):
    """The causal LM of a published folder, strictly: a tensor the model lacks, a tensor missing from the files
    or of another shape is a ValueError naming it. fp32 unless `dtype` says otherwise (transformers would take the
    checkpoint's dtype). `quantization="nf4"`: the decoder layers' linear weights in 4-bit NF4
    (llm/quantization.py). Never downloads, never runs remote code, never unpickles."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        if pickles := [name for name in PICKLE_FILES if (folder / name).is_file()]:
            raise FileNotFoundError(f"{folder} has only pickled weights ({pickles[0]}), which this project never "
                                    "unpickles: convert them to safetensors once")
        raise FileNotFoundError(f"{folder} has no weights (model.safetensors or model.safetensors.index.json)")
    extra = from_pretrained_kwargs(quantization, dtype)  # (a missing bitsandbytes is said before anything loads)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the loading report is ours (below), not transformers' warnings
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype or torch.float32, local_files_only=True, use_safetensors=True,
            output_loading_info=True, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [f"{kind.replace('_', ' ')}: {sorted(map(str, names))}" for kind, names in info.items() if names]
    if problems:
        raise ValueError(f"cannot load {folder}: " + "; ".join(problems))
    return check_quantized_layers(model)


def load_tokenizer(folder: str | os.PathLike):
    from .qwen2_tokenizer import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(folder)


def to_transformers(model, folder: Path) -> TransformersText:
    """The merged causal LM as it is: its config, its state dict (without `lm_head.weight` when tied to the
    embeddings, as the published tied folders have it), the folder's tokenizer.json."""
    from .qwen2_tokenizer import TOKENIZER_FILE

    config = copy.deepcopy(model.config)
    tensors = dict(model.state_dict())
    if config.tie_word_embeddings:
        head = tensors.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
            raise ValueError("the merged model's config ties lm_head to the embeddings, but their weights differ")
    tokenizer = Path(folder) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}")
    return TransformersText(config=config, tensors=tensors, tokenizer_json=tokenizer.read_text(encoding="utf-8"))


FAMILY = TextFamily(
    name="qwen2",
    model_types=("qwen2", "qwen3"),
    # Attention and MLP projections, as Qwen's and LLaVA's LoRA recipes for these models use.
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    layers="model.layers",
    embedding_modules=("embed_tokens", "lm_head"),
    load_model=load_model,
    load_tokenizer=load_tokenizer,
    to_transformers=to_transformers,
)
