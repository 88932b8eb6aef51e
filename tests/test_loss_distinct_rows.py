"""common.loss: a frozen LM head whose rows repeat (the CPU demo's tiny QWen) gives the loss and the gradients of
the ordinary full-vocabulary cross-entropy, computing each distinct row once; any other head takes the ordinary
path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.loss import distinct_rows, lm_logits, supervised_token_losses

VOCAB, HIDDEN, USED = 3000, 16, 40


def repeated_head(frozen: bool = True) -> nn.Linear:
    """Rows USED.. all equal to one row, as demo/compact_vocab.py writes the unused ids."""
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight[USED:] = torch.randn(HIDDEN) * 3
    head.weight.requires_grad_(not frozen)
    return head


def reference(hidden, labels, head, eps):
    """Shifted full logits and F.cross_entropy: what the loss is defined as."""
    targets = labels[:, 1:]
    keep = targets != -100
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="none", label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_repeated_rows_give_the_full_vocabulary_loss_and_gradients(eps):
    head = repeated_head()
    hidden = torch.randn(3, 9, HIDDEN, requires_grad=True)
    labels = torch.randint(0, USED, (3, 9))
    labels[:, :3] = -100
    labels[1, 5] = VOCAB - 1  # an id of the repeated row as a target
    assert distinct_rows(head) is not None and distinct_rows(head)[0].shape[0] == USED + 1
    rows, log_counts, inverse = distinct_rows(head)
    assert torch.equal(rows[inverse], head.weight) and log_counts.exp().sum().round() == VOCAB

    ours, keep = supervised_token_losses(hidden, labels, head, eps)
    expected = reference(hidden, labels, head, eps)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    grad_ours, = torch.autograd.grad(ours.sum(), hidden)
    grad_expected, = torch.autograd.grad(expected.sum(), hidden)
    torch.testing.assert_close(grad_ours, grad_expected, rtol=1e-4, atol=1e-4)  # fp32 sums over 3000 terms
    assert keep.sum() == ours.numel()


def test_other_heads_take_the_ordinary_path():
    assert distinct_rows(repeated_head(frozen=False)) is None  # trained: its rows will not stay equal
    distinct = nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    assert distinct_rows(distinct) is None  # a real checkpoint's head
    with_bias = nn.Linear(HIDDEN, VOCAB, bias=True).requires_grad_(False)
    with torch.no_grad():
        with_bias.weight[USED:] = 1.0
    assert distinct_rows(with_bias) is None


def test_rows_with_equal_sums_are_told_apart():
    head = repeated_head()
    with torch.no_grad():
        head.weight[USED: USED + 500] = head.weight[USED].flip(0)  # the same sum, another row
    rows, log_counts, inverse = distinct_rows(head)
    counts = sorted(log_counts.exp().round().int().tolist())
    assert rows.shape[0] == USED + 2 and counts[-2:] == [500, VOCAB - USED - 500]
    assert torch.equal(rows[inverse], head.weight)


def test_the_cache_follows_the_weight():
    head = repeated_head()
    assert distinct_rows(head)[0].shape[0] == USED + 1
    with torch.no_grad():
        head.weight[USED:] = torch.randn(VOCAB - USED, HIDDEN)  # an in-place change: the rows are distinct now
    assert distinct_rows(head) is None


def test_logits_from_distinct_rows_are_the_heads_own():
    """Generation's logits (with gradients off, also for a head that would train) equal lm_head(hidden)."""
    hidden = torch.randn(2, 5, HIDDEN)
    for head in (repeated_head(), repeated_head(frozen=False)):
        with torch.no_grad():
            assert distinct_rows(head) is not None
            logits = lm_logits(hidden, head)
            torch.testing.assert_close(logits, head(hidden), rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), head(hidden).argmax(-1))
    assert distinct_rows(repeated_head(frozen=False)) is None  # gradients on: its rows may change
