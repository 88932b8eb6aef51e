"""The causal-LM loss on the supervised positions only: shared by QWen's own LM head (qwen/modeling_qwen.py)
and the multimodal model of every language backbone (model/modeling_vlm.py), so that all of them compute the
same loss, in the same order of operations, without materialising [batch, length, vocab] logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supervised_token_losses(
    hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Linear, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position whose next label is not -100, computing logits only there:
    equal to shifting full logits and calling cross_entropy(ignore_index=-100, reduction="none"), without
    materialising [B, T, vocab] (151936 columns: about 1.2 GB of fp32 logits per 2k-token sample).

    Returns (losses [N] fp32, keep [B, T-1]): position t predicts labels[t + 1]; `keep` marks the N supervised
    positions in row-major order. With `label_smoothing` eps each token's loss is (1 - eps) * NLL + eps * the
    mean over the vocabulary of -log p (what transformers' label smoother computes, here on shifted labels).
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100  # [B, T-1]
    picked = hidden_states[:, :-1][keep]  # [N, hidden]
    logits = lm_head(picked).float()  # [N, vocab]
    losses = F.cross_entropy(logits, shift_labels[keep], reduction="none", label_smoothing=label_smoothing)
    return losses, keep


def normalise_loss(total: torch.Tensor, keep: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The summed token losses divided by `num_items_in_batch` when the Trainer gives it (the supervised tokens
    of the whole optimizer step, over gradient-accumulation steps and ranks), so every token weighs the same
    however the batch is split; else by this batch's own count. An all-ignored batch gives 0 (with a graph)."""
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
    return total / keep.sum().clamp(min=1)
