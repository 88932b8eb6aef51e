"""4-bit NF4 base weights (QLoRA) for every language backbone: how a family's `load_model` asks transformers for
them, and what training a LoRA on them takes.

`quantization="nf4"` loads the causal LM through transformers' own bitsandbytes integration
(`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`, the same path for QWen v1, whose
`QWenLMHeadModel` is a transformers `PreTrainedModel`, and for Qwen2 / Qwen3): every `nn.Linear` of the decoder
layers becomes a bitsandbytes `Linear4bit` holding NF4 codes in blocks of 64 values, whose fp32 scales are
quantised again (double quantisation: 8 bits per scale, one fp32 scale per 256 of them). The embeddings, the
norms, the biases and the LM head (transformers leaves the output embeddings out) stay in `dtype`; the layers
compute in `dtype` too (bf16 on a GPU, fp32 on CPU). The vision tower and the projector are not the LLM's and
never quantised. On a GPU the weights go straight to the current device (each rank's own under torchrun).

What peft's `prepare_model_for_kbit_training` does, and what this project does instead:
- it freezes every base parameter: LoRA does that (`peft.get_peft_model`), the align stage freezes all but the
  projector, and 4-bit weights cannot take a gradient anyway;
- it casts every non-quantised bf16/fp16 parameter to fp32: not done. They are frozen, so no update is lost to
  bf16 rounding; the norms already compute in fp32 inside (QWen's and Qwen2's RMSNorm); and at 7B the embeddings
  and the LM head in fp32 would cost 5.0 GB instead of 2.5 GB. The trainable weights are fp32 anyway: peft
  creates LoRA weights in fp32 (a `Linear4bit` base has no float dtype to follow) and the projector is fp32;
- it switches on gradient checkpointing, reentrant by default, and with it a hook that makes the embeddings'
  output require grad: not done. Checkpointing stays the training config's choice
  (`training.activation_checkpointing`) and is always non-reentrant here, which needs no such hook.
So a 4-bit model needs nothing beyond loading: LoRA, the loss, checkpointing and generation are unchanged.

bitsandbytes is optional (requirements-dev.txt, not requirements.txt): without it, asking for nf4 is one
`QuantizationError` saying what to install. This is the only module of the project that imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

NONE = "none"
NF4 = "nf4"
QUANTIZATIONS = (NONE, NF4)  # model.quantization: the LLM's linear weights as published, or 4-bit NF4
BITSANDBYTES = "bitsandbytes==0.50.2"  # the first release whose 4-bit layers also run on a plain x86 CPU


class QuantizationError(ValueError):
    """An unknown quantization, or nf4 where bitsandbytes is missing; the message says what to do."""


def check_quantization(quantization: str, where: str = "model.quantization") -> str:
    """`quantization` if it is one of QUANTIZATIONS, else QuantizationError naming the choices."""
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"{where}: {quantization!r} is not one of: {', '.join(QUANTIZATIONS)}")
    return quantization


def require_bitsandbytes() -> None:
    """QuantizationError (one line: what to install) unless bitsandbytes imports."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise QuantizationError(f"quantization nf4 needs bitsandbytes, which is not installed ({e}): "
                                f"pip install {BITSANDBYTES} (or use quantization none)") from None


def compute_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype 4-bit layers compute in: the model's (bf16 or fp16 on a GPU), fp32 when it is fp32 or unset."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def from_pretrained_kwargs(quantization: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """The extra `from_pretrained` arguments that load a causal LM with `quantization` (none: nothing)."""
    if check_quantization(quantization) == NONE:
        return {}
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(dtype),
    )}


def check_quantized_layers(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, after checking that bitsandbytes computes each of its 4-bit layers right where it lies: on CPU,
    bitsandbytes 0.50.2 dequantises a weight whose rows (in_features) are not a multiple of the block size (64)
    with the wrong scales (3-5x the NF4 error, measured on tiny layers), so such a layer on CPU is a
    QuantizationError naming it. Every published Qwen width is a multiple of 64; tiny test models may not be."""
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or module.weight.device.type != "cpu":
            continue
        if module.in_features % state.blocksize:
            raise QuantizationError(
                f"{name}: in_features {module.in_features} is not a multiple of the 4-bit block size "
                f"{state.blocksize}, which bitsandbytes' CPU kernel dequantises wrongly; use quantization none "
                "for this model on CPU (or a GPU)")
    return model


def quantization_of(llm: torch.nn.Module) -> str:
    """How a loaded causal LM (or a peft model of one) holds its linear weights: nf4 or none."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return NF4 if getattr(base, "is_loaded_in_4bit", False) else NONE
