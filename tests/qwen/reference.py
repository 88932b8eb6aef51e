"""An independent, deliberately naive QWen forward written from the documented behaviour of the official code.

It shares nothing with `qwen/modeling_qwen.py`: explicit per-row rotary tables built like the original's
cache (positions 0..T-1, `outer`, `cat(freqs, freqs)`), logn factors from `math.log(i, seq_length)`,
attention as an explicit softmax over an additive mask built the way the original builds it (the padding
mask as (1 - m) * finfo.min, then the causal part filled with finfo.min), fp32 throughout.
Used only by the tests, as the parity target.
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _ntk_alpha(n, seq_length):
    return max(2 ** math.ceil(math.log(n / seq_length, 2) + 1) - 1, 1)


def _rotary_table(T, dim, base, alpha):
    base = base * alpha ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()  # [T, dim]


def _rotate(t, cos, sin):
    # t: [T, H, D] for one row
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos[:, None, :] + rot * sin[:, None, :]


def reference_forward(sd: dict, cfg: dict, input_ids: torch.Tensor, attention_mask=None, training=False, alphas=None):
    """Logits [B, T, V] of the original QWen for `input_ids` [B, T] (no cache).

    `alphas` forces the NTK alphas (one per row), as the original does while decoding after a prefill.
    """
    B, T = input_ids.shape
    H = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    D = hidden // H
    seq_length = cfg["seq_length"]
    eps = cfg["layer_norm_epsilon"]

    if alphas is not None:
        pass
    elif training or not cfg["use_dynamic_ntk"]:
        alphas = [1.0] * B
    elif attention_mask is not None and seq_length < T:
        alphas = [_ntk_alpha(int(n), seq_length) for n in attention_mask.sum(-1).tolist()]
    else:
        alphas = [_ntk_alpha(T, seq_length)] * B
    tables = [_rotary_table(T, D, cfg["rotary_emb_base"], a) for a in alphas]

    logn = None
    if cfg["use_logn_attn"] and not training and seq_length < T:
        logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, T + 1)])

    neg = torch.finfo(torch.float32).min
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    if attention_mask is not None:
        add = (1.0 - attention_mask.float())[:, None, None, :] * neg  # [B, 1, 1, T]
        add = add.expand(B, 1, T, T).masked_fill(~causal, neg)
    else:
        add = torch.zeros(T, T).masked_fill(~causal, float("-inf"))[None, None].expand(B, 1, T, T)

    x = sd["transformer.wte.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h1 = _rms(x, sd[p + "ln_1.weight"], eps)
        qkv = h1 @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(hidden, dim=-1))
        q = torch.stack([_rotate(q[b], *tables[b]) for b in range(B)])
        k = torch.stack([_rotate(k[b], *tables[b]) for b in range(B)])
        if logn is not None:
            q = q * logn[None, :, None, None]
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D) + add
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.einsum("bhts,bshd->bthd", attn, v).reshape(B, T, hidden)
        o = ctx @ sd[p + "attn.c_proj.weight"].T
        if p + "attn.c_proj.bias" in sd:
            o = o + sd[p + "attn.c_proj.bias"]
        x = x + o
        h2 = _rms(x, sd[p + "ln_2.weight"], eps)
        a1 = h2 @ sd[p + "mlp.w1.weight"].T
        a2 = h2 @ sd[p + "mlp.w2.weight"].T
        if p + "mlp.w1.bias" in sd:
            a1, a2 = a1 + sd[p + "mlp.w1.bias"], a2 + sd[p + "mlp.w2.bias"]
        m = (a1 * torch.nn.functional.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
        if p + "mlp.c_proj.bias" in sd:
            m = m + sd[p + "mlp.c_proj.bias"]
        x = x + m
    x = _rms(x, sd["transformer.ln_f.weight"], eps)
    return x @ sd["lm_head.weight"].T


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's loss: shift by one, mean cross-entropy over labels != -100."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
