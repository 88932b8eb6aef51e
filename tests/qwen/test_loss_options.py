"""The loss's options: label smoothing on the shifted, supervised positions; per-row loss sums; no KV cache
when labels are given."""

from __future__ import annotations

import pytest
import torch

from qwen import QWenLMHeadModel
from qwen.tiny import write_tiny_qwen_checkpoint

VOCAB = 512


@pytest.fixture(scope="module")
def model(tmp_path_factory, byte_vocab_file):
    path = tmp_path_factory.mktemp("qwen") / "tiny"
    write_tiny_qwen_checkpoint(path, seed=2, bias_std=0.05, vocab_size=VOCAB, vocab_file=byte_vocab_file)
    return QWenLMHeadModel.from_pretrained(path)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (3, 12), generator=g)
    labels = x.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 8:] = -100  # padding
    labels[2, :] = -100
    labels[2, 10:] = x[2, 10:]  # one supervised prediction only (position 10 -> 11)
    return x, labels


def reference_smoothed(logits: torch.Tensor, labels: torch.Tensor, eps: float):
    """Per-token (1 - eps) * NLL + eps * mean over the vocabulary of -log p, position t predicting labels[t + 1],
    written out from log-probabilities (no F.cross_entropy). Returns (sum over supervised tokens, count, per row)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(-1)
    per_token = ((1 - eps) * nll + eps * uniform) * keep
    return per_token.sum(), int(keep.sum()), per_token.sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_is_shifted_and_token_weighted(model, eps):
    x, labels = batch()
    with torch.no_grad():
        logits = model(x).logits
        total, count, _ = reference_smoothed(logits, labels, eps)
        ours = model(x, labels=labels, label_smoothing=eps, return_logits=False).loss
        # the Trainer's num_items_in_batch (tokens of the whole optimizer step) divides the sum instead
        step = model(x, labels=labels, label_smoothing=eps, num_items_in_batch=40, return_logits=False).loss
    torch.testing.assert_close(ours.double(), total / count, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.double(), total / 40, atol=1e-5, rtol=1e-5)
    if eps:  # not the plain loss
        with torch.no_grad():
            plain = model(x, labels=labels, return_logits=False).loss
        assert abs(float(ours) - float(plain)) > 1e-3


def test_per_row_loss_sums(model):
    x, labels = batch(seed=1)
    with torch.no_grad():
        logits = model(x).logits
        out = model(x, labels=labels, return_row_loss_sums=True, return_logits=False)
    total, count, per_row = reference_smoothed(logits, labels, 0.0)
    torch.testing.assert_close(out.row_loss_sums.double(), per_row, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.loss.double(), total / count, atol=1e-5, rtol=1e-5)


class CountingCache:
    """Counts DynamicCache constructions while installed in place of qwen.modeling_qwen.DynamicCache."""

    def __init__(self, real):
        self.real, self.made = real, 0

    def __call__(self, *args, **kwargs):
        self.made += 1
        return self.real(*args, **kwargs)


def test_no_kv_cache_when_labels_are_given(model, monkeypatch):
    import qwen.modeling_qwen as modeling

    counter = CountingCache(modeling.DynamicCache)
    monkeypatch.setattr(modeling, "DynamicCache", counter)
    x, labels = batch()
    model.eval()
    monkeypatch.setattr(model.config, "use_cache", True)  # as after a Trainer run with use_cache: true
    with torch.no_grad():
        out = model(x, labels=labels)
    assert out.cache is None and counter.made == 0
    with torch.no_grad():  # without labels (generation's prefill) the cache is still built
        assert model(x).cache is not None and counter.made == 1
