"""Write a tiny random QWen checkpoint folder in exactly the official Qwen-7B-Chat layout.

The folder has what users download for the real model: `config.json` (every official field except
`auto_map`, which names the official repository's code files: this folder does not ship them),
safetensors weights with the official key names (one file, or shards + `model.safetensors.index.json`),
`qwen.tiktoken` (a small but real BPE vocabulary, special tokens at their official ids),
`tokenizer_config.json` and `generation_config.json`. Tests and the CPU demo load it through the very
same code that loads the real 7B. The weights are written directly from a seeded generator, not through
our model class, so loading is tested against a file our model code did not produce.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from common.fileio import staged_folder

from .checkpoint import save_sharded_safetensors
from .tiny_vocab import write_tiny_vocab

# The official vocabulary size (151643 BPE ranks + 208 specials, padded to a multiple of 128).
QWEN_VOCAB_SIZE = 151936


def tiny_qwen_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    seq_length: int = 8192,
    vocab_size: int = QWEN_VOCAB_SIZE,
    no_bias: bool = True,
    **overrides,
) -> dict:
    """config.json content shaped like the official Qwen-7B-Chat one, with tiny sizes."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "initializer_range": 0.02,
        "kv_channels": hidden_size // num_attention_heads,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": no_bias,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": vocab_size,
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown QWen config fields: {sorted(unknown)}")
    config.update(overrides)
    return config


def random_qwen_state_dict(config: dict, *, seed: int = 0, bias_std: float = 0.0) -> dict[str, torch.Tensor]:
    """Official key names, the official init (N(0, 0.02), scaled residual projections, unit norms).

    `bias_std` > 0 gives the c_attn biases random values (the official init zeroes them), so tests can
    tell a loaded bias from a missing one.
    """
    g = torch.Generator().manual_seed(seed)
    h, ff = config["hidden_size"], config["intermediate_size"] // 2
    std = config["initializer_range"]
    out_std = std / math.sqrt(2 * config["num_hidden_layers"])

    def normal(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.wte.weight": normal(config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = torch.ones(h)
        sd[p + "attn.c_attn.weight"] = normal(3 * h, h)
        sd[p + "attn.c_attn.bias"] = normal(3 * h, s=bias_std) if bias_std else torch.zeros(3 * h)
        sd[p + "attn.c_proj.weight"] = normal(h, h, s=out_std)
        sd[p + "ln_2.weight"] = torch.ones(h)
        sd[p + "mlp.w1.weight"] = normal(ff, h)
        sd[p + "mlp.w2.weight"] = normal(ff, h)
        sd[p + "mlp.c_proj.weight"] = normal(h, ff, s=out_std)
        if not config["no_bias"]:
            biases = (("attn.c_proj.bias", h), ("mlp.w1.bias", ff), ("mlp.w2.bias", ff), ("mlp.c_proj.bias", h))
            for name, size in biases:
                sd[p + name] = normal(size, s=bias_std) if bias_std else torch.zeros(size)
    sd["transformer.ln_f.weight"] = torch.ones(h)
    sd["lm_head.weight"] = normal(config["vocab_size"], h)
    return sd


GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}

TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
}


def write_tiny_qwen_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    num_shards: int = 1,
    bias_std: float = 0.0,
    state_dict: dict[str, torch.Tensor] | None = None,
    vocab_file: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    **config_fields,
) -> Path:
    """Write a complete tiny checkpoint folder at `path` (atomically: built aside, then renamed).

    `config_fields` are official config.json fields (hidden_size, num_hidden_layers, seq_length, ...).
    `state_dict` replaces the random weights (e.g. after a demo pretraining). `vocab_file` is copied as
    qwen.tiktoken; by default a small real BPE vocabulary is trained and written.
    """
    path = Path(path)
    config = tiny_qwen_config(**config_fields)
    if state_dict is None:
        state_dict = random_qwen_state_dict(config, seed=seed, bias_std=bias_std)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}

    with staged_folder(path) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        (staging / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        save_sharded_safetensors(state_dict, staging, num_shards=num_shards)
        if vocab_file is not None:
            shutil.copyfile(vocab_file, staging / "qwen.tiktoken")
        else:
            write_tiny_vocab(staging / "qwen.tiktoken")
    return path
