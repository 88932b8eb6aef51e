"""`QWenConfig`: reads the official Qwen-7B / Qwen-7B-Chat `config.json` unchanged.

Every field of the official file is accepted. Fields that only pick CUDA kernels or precision tricks of
the original implementation (flash-attn selection, KV-cache quantisation, the fp32-softmax switch of
its non-SDPA path, ONNX export) are kept so the file round-trips, and logged once as unused. The first
public release of Qwen-7B used GPT-2 style names (`n_embd`, `n_layer`, ...); those are mapped to the
current names.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Names of the first Qwen-7B release (Aug 2023) -> current names.
_LEGACY_NAMES = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
    "embd_pdrop": "emb_dropout_prob",
    "attn_pdrop": "attn_dropout_prob",
}

# Accepted for compatibility, with no effect here (SDPA, an fp32 rotary and norm, and a plain KV cache).
_UNUSED_FIELDS = {
    "use_cache_quantization": "KV-cache int8 quantisation is not implemented; the cache keeps the model dtype",
    "use_cache_kernel": "selects a CUDA kernel for the quantised cache",
    "softmax_in_fp32": "only affects the original's non-SDPA attention path",
    "onnx_safe": "ONNX export switch",
    "scale_attn_weights": "attention is always scaled by 1/sqrt(head_dim), as in the original",
    "resid_pdrop": "the original applies no residual dropout",
    "n_positions": "not used by the original either",
    "params_dtype": "the weights' dtype is chosen at load time",
    "bias_dropout_fusion": "a Megatron kernel switch",
    "apply_residual_connection_post_layernorm": "must be false (pre-norm), as in every Qwen-7B release",
    "fp32_residual_connection": "a Megatron switch",
    "activation": "always SwiGLU",
    "pos_emb": "always rotary",
    "tokenizer_type": "the tokenizer is QWenTokenizer",
}


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Legacy names are read (and written) through the current attributes.
    attribute_map = _LEGACY_NAMES

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: str | bool = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        tie_word_embeddings: bool = False,
        use_cache_quantization: bool = False,
        use_cache_kernel: bool = False,
        softmax_in_fp32: bool = False,
        seq_length: int = 8192,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.intermediate_size = intermediate_size
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        self.seq_length = seq_length
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._log_unused(kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that are rotated (the original: kv_channels * rotary_pct)."""
        return self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)

    def _log_unused(self, extra: dict) -> None:
        notes = []
        for name, why in _UNUSED_FIELDS.items():
            value = getattr(self, name, extra.get(name))
            if name in ("scale_attn_weights",) and value is True:
                continue
            if value not in (None, False, 0, 0.0) or name in extra:
                notes.append(f"{name}={value!r} ({why})")
        if notes:
            logger.info("QWenConfig: accepted but unused: %s", "; ".join(notes))
        if self.use_cache_quantization:
            logger.warning(
                "QWenConfig: use_cache_quantization=True is ignored: the KV cache keeps the model dtype "
                "(outputs match the unquantised original)."
            )

    def validate_architecture(self) -> None:
        """Refuse shapes the original code cannot express, with a message naming the fields."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels * num_attention_heads ({self.kv_channels} * {self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size}), as in every Qwen-7B release"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size ({self.intermediate_size}) must be even (w1 and w2 each take half)")
        if not 0.0 < self.rotary_pct <= 1.0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_pct={self.rotary_pct} gives an odd or empty rotary dimension ({self.rotary_dim})")
