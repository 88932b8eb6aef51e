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
    distinct = distinct_rows(lm_head)
    if distinct is not None:
        return _losses_over_distinct_rows(picked, shift_labels[keep], *distinct, label_smoothing), keep
    logits = lm_head(picked).float()  # [N, vocab]
    losses = F.cross_entropy(logits, shift_labels[keep], reduction="none", label_smoothing=label_smoothing)
    return losses, keep


def distinct_rows(lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(the distinct rows [U, hidden], log of how often each occurs [U], each row's distinct index [vocab]) of a
    frozen LM head (or any, with gradients off) in which fewer than half the rows are distinct; None for any other
    head. Cached on the head while its weight is unchanged.

    Equal rows give equal logits, so the softmax needs each once, weighted by its count. The CPU demo's tiny
    QWen is such a head: the ~1,030 ids its text uses, and one row repeated for the 150,909 others
    (demo/compact_vocab.py); a real checkpoint has none and takes the ordinary path after one cheap check. Only
    a plain nn.Linear without bias whose weight is frozen and whole (not a DeepSpeed or FSDP shard, not
    quantised) qualifies, as the weight is read directly.
    """
    weight = getattr(lm_head, "weight", None)
    if (type(lm_head) is not nn.Linear or lm_head.bias is not None or weight is None
            or (weight.requires_grad and torch.is_grad_enabled()) or weight.dim() != 2
            or weight.shape != (lm_head.out_features, lm_head.in_features) or hasattr(weight, "ds_id")):
        return None
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = getattr(lm_head, "_distinct_rows", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = None
    with torch.no_grad():
        # rows with different sums differ: group the rows by their sum, and if each row equals the first row of
        # its group, the groups are the distinct rows (else, rarely, equal sums of different rows: sort them all)
        sums, inverse = torch.unique(weight.float().sum(dim=1), return_inverse=True)
        if sums.numel() * 2 < weight.shape[0]:
            index = torch.arange(weight.shape[0], device=weight.device)
            first = torch.full_like(sums, weight.shape[0], dtype=torch.long).scatter_reduce(0, inverse, index, "amin")
            if torch.equal(weight, weight[first[inverse]]):
                rows, counts = weight[first], torch.bincount(inverse, minlength=sums.numel())
            else:
                rows, inverse, counts = torch.unique(weight, dim=0, return_inverse=True, return_counts=True)
            if rows.shape[0] * 2 < weight.shape[0]:
                result = (rows, counts.float().log(), inverse)
    lm_head._distinct_rows = (key, result)
    return result


def lm_logits(hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """`lm_head(hidden_states)`, the product computed once per distinct row when the head's rows repeat
    (`distinct_rows`): generation with the demo's tiny QWen then costs ~1,000 rows per token, not 151,936."""
    distinct = distinct_rows(lm_head)
    if distinct is None:
        return lm_head(hidden_states)
    rows, _, inverse = distinct
    logits = F.linear(hidden_states, rows)
    # gather, not index_select: the same copy, ~1/3 sooner along the last dim on CPU (its 151,936 columns are
    # most of a decoding step's time with the demo's QWen)
    return torch.gather(logits, -1, inverse.expand(*logits.shape[:-1], -1))


def _losses_over_distinct_rows(picked: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                               log_counts: torch.Tensor, inverse: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """F.cross_entropy over the full vocabulary, computed from each distinct row once (see `distinct_rows`)."""
    logits = F.linear(picked, rows).float()  # [N, U]
    log_normaliser = torch.logsumexp(logits + log_counts, dim=-1)  # log sum over all vocab rows of exp(logit)
    nll = log_normaliser - logits.gather(1, inverse[targets].unsqueeze(1)).squeeze(1)
    if not label_smoothing:
        return nll
    mean_logit = (logits * log_counts.exp()).sum(-1) / inverse.numel()  # the mean over the full vocabulary
    return (1 - label_smoothing) * nll + label_smoothing * (log_normaliser - mean_logit)


def normalise_loss(total: torch.Tensor, keep: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The summed token losses divided by `num_items_in_batch` when the Trainer gives it (the supervised tokens
    of the whole optimizer step, over gradient-accumulation steps and ranks), so every token weighs the same
    however the batch is split; else by this batch's own count. An all-ignored batch gives 0 (with a graph)."""
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
    return total / keep.sum().clamp(min=1)
