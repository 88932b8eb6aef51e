"""QWen v1 (Qwen-7B, Qwen-7B-Chat: `model_type` "qwen"), through the project's own implementation in `qwen/`,
which loads the official folders unchanged and computes what the official code computes.

For the transformers-native export QWen v1 is written as transformers' Qwen2, which is the same architecture
within `seq_length`: RMSNorm, rotary on all channels, bias on q/k/v only, SwiGLU. Mapping: wte -> embed_tokens,
ln_1/ln_2 -> input/post_attention_layernorm, c_attn split in three along the output dimension -> q/k/v (weights
and biases), attn.c_proj -> o_proj, mlp.w2 -> gate_proj (SiLU is applied to w2's output), mlp.w1 -> up_proj,
mlp.c_proj -> down_proj, ln_f -> norm; Qwen2's intermediate_size is half of QWen's. Past `seq_length` QWen
switches on dynamic NTK and logn attention scaling, which Qwen2 does not have: max_position_embeddings is set to
seq_length and the export says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import TextFamily, TransformersText
from .quantization import check_quantized_layers, from_pretrained_kwargs


def load_model(folder: str | os.PathLike, dtype: torch.dtype | None = None, quantization: str = "none"):
    """QWenLMHeadModel of an official folder, strictly (every tensor present with its shape). Without `dtype`, the
    config's bf16/fp16 flags choose it (fp32 otherwise), as the official code does. `quantization="nf4"`: the
    decoder layers' linear weights in 4-bit NF4 (llm/quantization.py)."""
    from qwen import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}),
                                            **from_pretrained_kwargs(quantization, dtype))
    return check_quantized_layers(model)


def load_tokenizer(folder: str | os.PathLike):
    from qwen import QWenTokenizer

    return QWenTokenizer.from_pretrained(folder)


def qwen2_text_config(qwen):
    """The transformers Qwen2Config that computes what the QWenConfig `qwen` computes up to its seq_length.
    ValueError for a QWen that Qwen2 cannot express."""
    from transformers import Qwen2Config

    qwen.validate_architecture()
    if qwen.rotary_pct != 1.0:
        raise ValueError(f"rotary_pct={qwen.rotary_pct}: Qwen2 rotates every channel of each head (rotary_pct 1.0)")
    if not qwen.no_bias:
        raise ValueError("no_bias=false: Qwen2 has no bias on o_proj and the MLP "
                         "(every Qwen-7B release has no_bias=true)")
    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=qwen.vocab_size,
        hidden_size=qwen.hidden_size,
        intermediate_size=qwen.intermediate_size // 2,  # QWen's counts w1 and w2 together
        num_hidden_layers=qwen.num_hidden_layers,
        num_attention_heads=qwen.num_attention_heads,
        num_key_value_heads=qwen.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=qwen.seq_length,
        rms_norm_eps=qwen.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(qwen.rotary_emb_base)},
        tie_word_embeddings=qwen.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def qwen2_tensors(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """QWen's state dict (official names) -> Qwen2ForCausalLM's names; every tensor used once."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"the merged model has no tensor {name}")
        used.add(name)
        return state[name]

    out["model.embed_tokens.weight"] = take("transformer.wte.weight")
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "ln_1.weight")
        for kind in ("weight", "bias"):
            q, k, v = take(src + f"attn.c_attn.{kind}").chunk(3, dim=0)  # [3h, ...] -> q, k, v in this order
            out[dst + f"self_attn.q_proj.{kind}"] = q
            out[dst + f"self_attn.k_proj.{kind}"] = k
            out[dst + f"self_attn.v_proj.{kind}"] = v
        out[dst + "self_attn.o_proj.weight"] = take(src + "attn.c_proj.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "ln_2.weight")
        out[dst + "mlp.gate_proj.weight"] = take(src + "mlp.w2.weight")  # QWen: c_proj(w1(x) * silu(w2(x)))
        out[dst + "mlp.up_proj.weight"] = take(src + "mlp.w1.weight")
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.c_proj.weight")
    out["model.norm.weight"] = take("transformer.ln_f.weight")
    if "lm_head.weight" in state:  # absent when tied to the embeddings
        out["lm_head.weight"] = take("lm_head.weight")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"tensors of the merged model with no place in Qwen2: {left[:5]}")
    return out


def to_transformers(model, folder: Path) -> TransformersText:
    """The merged QWenLMHeadModel `model` as transformers' Qwen2 (see the module docstring), with the fast
    tokenizer rebuilt from the folder's qwen.tiktoken (the ids of QWenTokenizer)."""
    from qwen.fast_tokenizer import build_fast_tokenizer
    from qwen.tokenization_qwen import VOCAB_FILE_NAME

    qwen = model.config
    limits = ()
    if qwen.use_dynamic_ntk or qwen.use_logn_attn:
        limits = (f"Contexts up to {qwen.seq_length} tokens (`max_position_embeddings` = seq_length). Up to there "
                  "the export computes what QWen v1 computes; past it QWen v1 switches on dynamic NTK rotary scaling "
                  "and logn attention scaling, which Qwen2 does not have, so longer contexts give different (likely "
                  "worse) outputs than the original code would.",)
    return TransformersText(
        config=qwen2_text_config(qwen),
        tensors=qwen2_tensors(model.state_dict(), qwen.num_hidden_layers),
        tokenizer_json=build_fast_tokenizer(Path(folder) / VOCAB_FILE_NAME).to_str(pretty=True),
        converted_from="QWen v1",
        renamed="c_attn → q/k/v_proj, attn.c_proj → o_proj, w1 → up_proj, w2 → gate_proj, mlp.c_proj → down_proj, "
                "wte → embed_tokens",
        limits=limits,
    )


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
    to_transformers=to_transformers,
)
