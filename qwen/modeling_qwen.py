"""QWen (Qwen-7B v1) in plain PyTorch, weight-compatible with the official checkpoints.

Reads top to bottom in the order the pieces compose: RMSNorm, rotary embedding (pure functions, fp32),
attention, MLP, block, then the model, the LM head and loading. The module names are the official
ones (`transformer.h.N.attn.c_attn`, ...), so an official checkpoint folder loads unchanged.

What the original computes and this file reproduces (fp32 logits agree to 1e-5 in our tests):
- RMSNorm in fp32, cast back to the input dtype, then scaled by the weight.
- Rotary embedding on all of each head's channels (rotary_pct), "rotate half" layout, in fp32.
- Dynamic NTK: at inference, the rotary base grows with the context (alpha = 2^ceil(log2(len/seq_length)+1) - 1);
  with a padding mask and a context past `seq_length`, alpha is chosen per row from the row's true length;
  during decoding the alphas of the prefill are kept (here on the cache object, not in module state).
- logn attention: at inference, past `seq_length`, queries at position i are scaled by log_{seq_length}(i+1),
  i counted in the padded sequence, as the original does.
- Neither of the two in training mode. MLP: c_proj(w1(x) * silu(w2(x))): the activation is on w2's output.
Where this file differs on purpose: several new tokens after a cache keep the causal mask (the original drops
it), any batch size works with left padding, and the loss ignores -100 without NaN on an empty batch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from common.checkpointing import non_reentrant
from common.loss import lm_logits, normalise_loss, supervised_token_losses

from .checkpoint import checkpoint_shapes
from .configuration_qwen import QWenConfig

logger = logging.get_logger(__name__)

try:  # optional, GPU only
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


# --------------------------------------------------------------------------------------------------
# Norm
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight  # cast back first, then scale: the original's order


# --------------------------------------------------------------------------------------------------
# Rotary embedding, dynamic NTK and logn scaling (pure functions, fp32)
# --------------------------------------------------------------------------------------------------


def ntk_alpha_for_length(length: int, seq_length: int) -> float:
    """The original's dynamic-NTK alpha for a context of `length` tokens (1 up to `seq_length`)."""
    context_value = math.log(max(length, 1) / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rotary_inv_freq(dim: int, base: float, ntk_alpha: float, device=None) -> torch.Tensor:
    base = base * ntk_alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))  # [dim/2]


def rotary_cos_sin(positions: torch.Tensor, inv_freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for `positions` [T] and one inv_freq row per batch row (or one shared row): [R, T, 1, dim]."""
    freqs = positions.float()[None, :, None] * inv_freqs[:, None, :]  # [R, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [R, T, 1, dim]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of t [B, T, H, D] in fp32; the rest pass through."""
    rot_dim = cos.shape[-1]
    t_rot = t[..., :rot_dim].float()
    t_rot = t_rot * cos + _rotate_half(t_rot) * sin
    if rot_dim == t.shape[-1]:  # rotary_pct 1 (Qwen-7B): nothing passes, and joining an empty rest is a copy
        return t_rot.type_as(t)
    return torch.cat((t_rot, t[..., rot_dim:].float()), dim=-1).type_as(t)


def logn_scale(start: int, end: int, seq_length: int, device=None) -> torch.Tensor:
    """Query scale for positions [start, end): log_{seq_length}(i + 1) past seq_length, else 1. [1, T, 1, 1]"""
    n = torch.arange(start + 1, end + 1, dtype=torch.float64, device=device)
    scale = torch.where(n > seq_length, torch.log(n) / math.log(seq_length), torch.ones_like(n))
    return scale.float()[None, :, None, None]


# --------------------------------------------------------------------------------------------------
# Attention, MLP, block
# --------------------------------------------------------------------------------------------------


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        projection_size = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection_size, bias=True)
        self.c_proj = nn.Linear(projection_size, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout_prob = config.attn_dropout_prob
        self.use_flash_attn = config.use_flash_attn

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        attention_bias: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden_size, dim=2)
        q = q.view(B, T, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, self.num_heads, self.head_dim)
        v = v.view(B, T, self.num_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H, past + T, D]
        if logn is not None:
            q = q * logn.transpose(1, 2).type_as(q)  # logn [1, T, 1, 1] -> [1, 1, T, 1]

        dropout = self.attn_dropout_prob if self.training else 0.0
        out = self._attend(q, k, v, attention_bias, dropout)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.hidden_size)
        return self.c_proj(out)

    def _attend(self, q, k, v, attention_bias, dropout):
        T, S = q.shape[2], k.shape[2]
        if attention_bias is not None:  # padding: an additive mask that already holds the causal part
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=dropout)
        if (
            flash_attn_func is not None
            and self.use_flash_attn in ("auto", True)
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
        ):
            # flash-attn aligns the causal mask to the bottom right: correct for T new tokens after S - T cached ones.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, causal=True)
            return out.transpose(1, 2)
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if T == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # Several new tokens after a cache: new token i sees the cache and new tokens 0..i.
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        ff_dim = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff_dim, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff_dim, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, cos=None, sin=None, logn=None, attention_bias=None, cache=None):
        h = hidden_states + self.attn(self.ln_1(hidden_states), cos, sin, logn, attention_bias, cache)
        return h + self.mlp(self.ln_2(h))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def padding_attention_bias(
    attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, T, S] from a 2D 0/1 mask over all S = past + T keys, causal part included.

    Masked entries hold the dtype's minimum, not -inf, as in the original: a query that sees no real key
    (a left-padding position) gets a uniform softmax instead of NaN.
    """
    S = attention_mask.shape[-1]
    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # [B, 1, 1, S]
    bias = bias.expand(-1, -1, query_len, -1)
    causal = torch.ones(query_len, S, dtype=torch.bool, device=attention_mask.device).tril(S - query_len)
    return bias.masked_fill(~causal, torch.finfo(dtype).min)


def check_checkpoint_tensors(cls, config: QWenConfig, folder: Path) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor, before loading anything."""
    found = checkpoint_shapes(folder)
    if found is None:
        return
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    for pattern in cls._keys_to_ignore_on_load_missing or []:  # e.g. a subclass's new, freshly initialised modules
        expected = {k: v for k, v in expected.items() if not re.search(pattern, k)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing tensors: {missing}")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensors: {unexpected}")
    if mismatched := [f"{k} (file {found[k]} vs config {expected[k]})"
                      for k in sorted(expected) if k in found and found[k] != expected[k]]:
        problems.append(f"tensors whose shape does not match config.json: {mismatched}")
    if problems:
        raise ValueError(f"cannot load {folder}: " + "; ".join(problems))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # forward takes `num_items_in_batch` and normalises the loss by it: the Trainer then weighs every supervised
    # token equally across gradient-accumulation steps and ranks (and does not divide by the steps again).
    accepts_loss_kwargs = True

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """Activation checkpointing of the blocks, always non-reentrant, so that it is correct by construction:
        reentrant checkpointing needs an input that requires grad (with frozen embeddings a text-only batch
        would give a loss without a graph unless a hook fixes it) and under DDP marks LoRA weights ready twice.
        `use_reentrant=True` is refused; torch's own default (reentrant) never applies."""
        kwargs = non_reentrant(activation_checkpointing_kwargs)  # (ValueError for use_reentrant=True)
        super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def _init_weights(self, module: nn.Module) -> None:
        """The original's init: N(0, initializer_range), zero biases, unit norms, scaled residual projections."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        if isinstance(module, (QWenAttention, QWenMLP)):
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load a local checkpoint folder (official layout), strictly: every tensor present and of the right shape.

        Raises FileNotFoundError for a missing folder/config/weights and ValueError naming every missing,
        unexpected or mis-shaped tensor. Never downloads; never runs remote code. Without `dtype`, the
        original's `bf16`/`fp16` flags in config.json choose it (fp32 otherwise).
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"QWen checkpoint folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a QWen checkpoint folder")
        weight_files = ("model.safetensors", "model.safetensors.index.json",
                        "pytorch_model.bin", "pytorch_model.bin.index.json")
        if not any((folder / name).is_file() for name in weight_files):
            raise FileNotFoundError(f"{folder} has no weights "
                                    "(expected model.safetensors or model.safetensors.index.json)")
        if kwargs.pop("trust_remote_code", False):
            raise ValueError("trust_remote_code is never needed nor allowed: this class is the QWen implementation")
        config = kwargs.get("config") or cls.config_class.from_pretrained(folder)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["local_files_only"] = True
        check_checkpoint_tensors(cls, config, folder)
        model, info = super().from_pretrained(folder, *args, output_loading_info=True, **kwargs)
        problems = [f"{k}: {sorted(map(str, v))}" for k, v in info.items() if v]
        if problems:
            raise ValueError(f"cannot load {folder}: " + "; ".join(problems))
        return (model, info) if want_info else model


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        config.validate_architecture()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _ntk_alphas(self, attention_mask, past_length: int, kv_length: int, cache) -> list[float]:
        """Dynamic-NTK alphas: one shared, or one per row. Decoding reuses the prefill's, stored on the cache."""
        cfg = self.config
        if self.training or not cfg.use_dynamic_ntk:
            return [1.0]
        if past_length > 0:
            stored = getattr(cache, "qwen_ntk_alphas", None)
            return stored if stored is not None else [ntk_alpha_for_length(past_length, cfg.seq_length)]
        if attention_mask is not None and kv_length > cfg.seq_length:
            true_lengths = attention_mask.sum(dim=-1).tolist()
            return [ntk_alpha_for_length(int(n), cfg.seq_length) for n in true_lengths]
        return [ntk_alpha_for_length(kv_length, cfg.seq_length)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`position_ids` is accepted for API compatibility and ignored: like the original, rotary positions
        count from the start of the (padded) sequence, which gives the same attention scores."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        kv_length = past_length + T

        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, kv_length):
                raise ValueError(
                    f"attention_mask must be [batch, past + new] = [{B}, {kv_length}], "
                    f"got {tuple(attention_mask.shape)}"
                )
            if T > 1 and bool(attention_mask.all()):
                # Nothing masked: the causal fast path (flash kernels) is exact. Not checked for single-token
                # decoding steps, where the check would cost a GPU sync per token and the mask is cheap.
                attention_mask = None

        # Rotary tables for positions past_length .. kv_length-1, one row per distinct NTK alpha.
        alphas = self._ntk_alphas(attention_mask, past_length, kv_length, cache)
        if cache is not None and past_length == 0:
            cache.qwen_ntk_alphas = alphas
        device = inputs_embeds.device
        cfg = self.config
        inv_freqs = torch.stack([rotary_inv_freq(cfg.rotary_dim, cfg.rotary_emb_base, a, device) for a in alphas])
        positions = torch.arange(past_length, kv_length, device=device)
        cos, sin = rotary_cos_sin(positions, inv_freqs)  # [1 or B, T, 1, rotary_dim]

        logn = None
        if cfg.use_logn_attn and not self.training and kv_length > cfg.seq_length:
            logn = logn_scale(past_length, kv_length, cfg.seq_length, device)

        attention_bias = None
        if attention_mask is not None:
            attention_bias = padding_attention_bias(attention_mask, T, inputs_embeds.dtype)

        hidden_states = self.drop(inputs_embeds)
        all_hidden = [] if output_hidden_states else None
        for block in self.h:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(
                hidden_states, cos=cos, sin=sin, logn=logn, attention_bias=attention_bias, cache=cache
            )
        hidden_states = self.ln_f(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


@dataclass
class QWenCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `row_loss_sums` [B]: each row's summed (not averaged) token losses, given
    with `return_row_loss_sums=True`, so that an evaluation can weigh every supervised token the same."""

    row_loss_sums: torch.Tensor | None = None


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        num_items_in_batch=None,
        label_smoothing: float = 0.0,
        return_row_loss_sums: bool = False,
        **kwargs,
    ) -> QWenCausalLMOutput:
        """Standard causal-LM forward. With `labels`, the loss is computed from the supervised positions only
        (`label_smoothing` applied there, see `supervised_token_losses`); `return_logits=False` then skips the
        full [B, T, vocab] logits (the training path), and no KV cache is built unless `use_cache=True` asks."""
        if labels is not None and use_cache is None:
            use_cache = False  # a loss needs no cache (at 7B, batch 8 x 2048 tokens it would hold 8.6 GB)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        loss = row_loss_sums = None
        if labels is not None:
            losses, keep = supervised_token_losses(hidden_states, labels, self.lm_head, label_smoothing)
            loss = normalise_loss(losses.sum(), keep, num_items_in_batch)
            if return_row_loss_sums:
                row_loss_sums = losses.new_zeros(keep.shape).masked_scatter(keep, losses).sum(-1)  # [B]
        logits = None
        if return_logits or labels is None:
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
            logits = lm_logits(kept, self.lm_head)
        return QWenCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            row_loss_sums=row_loss_sums,
        )
