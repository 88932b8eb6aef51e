"""QWen model: parity with an independent reference of the original, caching, generation, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen import QWenConfig, QWenLMHeadModel
from qwen.modeling_qwen import apply_rotary, rotary_cos_sin, rotary_inv_freq
from qwen.tiny import random_qwen_state_dict, tiny_qwen_config, write_tiny_qwen_checkpoint
from tests.qwen.reference import reference_forward, reference_loss

VOCAB = 512  # model-only tests don't need the 151936-row embedding
SEQ_LENGTH = 16  # short training length, so that NTK scaling and logn kick in at tiny sizes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, byte_vocab_file):
    path = tmp_path_factory.mktemp("qwen") / "tiny"
    write_tiny_qwen_checkpoint(
        path, seed=1, bias_std=0.05, vocab_size=VOCAB, seq_length=SEQ_LENGTH, vocab_file=byte_vocab_file
    )
    return path


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_file(str(ckpt / "model.safetensors")), json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def model(ckpt):
    return QWenLMHeadModel.from_pretrained(ckpt)


def ids(b, t, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(lengths, total):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n :] = 1
    return mask


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("T", [5, SEQ_LENGTH, 40, 70])  # 40 and 70: past seq_length, NTK alpha 7 and 15, logn
def test_logits_match_reference_eval(model, ref, T):
    sd, cfg = ref
    x = ids(2, T)
    with torch.no_grad():
        ours = model(x).logits
    torch.testing.assert_close(ours, reference_forward(sd, cfg, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lengths,T", [((7, 3), 7), ((40, 25, 12), 40)])
def test_left_padded_logits_match_reference(model, ref, lengths, T):
    """Per-row NTK alpha from each row's true length (second case: 40 -> alpha 7, 25 -> 3, 12 -> 1)."""
    sd, cfg = ref
    x, mask = ids(len(lengths), T, seed=3), left_pad_mask(lengths, T)
    with torch.no_grad():
        ours = model(x, attention_mask=mask).logits
    expected = reference_forward(sd, cfg, x, attention_mask=mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)  # pad positions included


def test_left_padded_row_equals_unpadded_row(model):
    x = ids(1, 9, seed=4)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    with torch.no_grad():
        alone = model(x).logits
        batch = model(padded, attention_mask=left_pad_mask([9], 13)).logits
    torch.testing.assert_close(batch[:, 4:], alone, atol=1e-5, rtol=1e-4)


def test_train_mode_has_no_ntk_nor_logn(ckpt, ref):
    sd, cfg = ref
    model = QWenLMHeadModel.from_pretrained(ckpt).train()
    x = ids(2, 40, seed=5)
    ours = model(x).logits
    torch.testing.assert_close(ours, reference_forward(sd, cfg, x, training=True), atol=1e-5, rtol=1e-4)
    assert (ours - reference_forward(sd, cfg, x, training=False)).abs().max() > 1e-4


def test_loss_and_gradients_match_reference(ckpt, ref):
    sd, cfg = ref
    model = QWenLMHeadModel.from_pretrained(ckpt).train()
    x = ids(2, 12, seed=6)
    labels = x.clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100
    out = model(x, labels=labels)
    out.loss.backward()

    leaves = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    ref_loss = reference_loss(reference_forward(leaves, cfg, x, training=True), labels)
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-5)
    params = dict(model.named_parameters())
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.1.mlp.w2.weight", "transformer.ln_f.weight", "lm_head.weight"):
        torch.testing.assert_close(params[name].grad, leaves[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_loss_without_logits_is_the_same(model):
    x = ids(2, 10, seed=7)
    labels = x.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        full = model(x, labels=labels)
        lean = model(x, labels=labels, return_logits=False)
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, reference_loss(full.logits, labels), atol=1e-6, rtol=1e-5)
    all_ignored = model(x, labels=torch.full_like(x, -100), return_logits=False).loss
    assert all_ignored.item() == 0.0


def test_inputs_embeds_equals_input_ids(model):
    x = ids(2, 8, seed=8)
    with torch.no_grad():
        a = model(input_ids=x).logits
        b = model(inputs_embeds=model.transformer.wte(x)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=x, inputs_embeds=model.transformer.wte(x))


# ---------------------------------------------------------------- KV cache and generation


def test_cached_decoding_equals_full_forward(model):
    x = ids(2, 14, seed=9)  # stays within seq_length, where the full forward uses the same rotary base
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(6, 10):  # one token at a time
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        out = model(x[:, 10:14], cache=cache, use_cache=True)  # several new tokens after a cache: causal kept
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_cached_decoding_keeps_prefill_ntk_alpha(model, ref):
    """Past seq_length, decoding keeps the prefill's rotary base (the original's behaviour)."""
    sd, cfg = ref
    x = ids(1, 34, seed=10)
    with torch.no_grad():
        out = model(x[:, :32], use_cache=True)  # 32 tokens: alpha 3
        steps = [model(x[:, t : t + 1], cache=out.cache, use_cache=True).logits for t in (32, 33)]
        recomputed = model(x).logits[:, -2:]  # a fresh 34-token forward uses alpha 7
    assert out.cache.qwen_ntk_alphas == [3]
    kept = reference_forward(sd, cfg, x, alphas=[3])[:, -2:]
    torch.testing.assert_close(torch.cat(steps, dim=1), kept, atol=1e-5, rtol=1e-4)
    assert (recomputed - kept).abs().max() > 1e-4  # ten times the parity tolerance: a different base


def test_left_padded_cached_decoding_matches_reference(model, ref):
    sd, cfg = ref
    x, mask = ids(2, 10, seed=11), left_pad_mask([10, 6], 10)
    with torch.no_grad():
        out = model(x[:, :7], attention_mask=mask[:, :7], use_cache=True)
        step = model(x[:, 7:], attention_mask=mask, cache=out.cache, use_cache=True).logits
    expected = reference_forward(sd, cfg, x, attention_mask=mask)[:, 7:]
    torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-4)


def _greedy(model, prompt, mask=None, n=6, **kw):
    return model.generate(
        prompt, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw
    )


def test_batched_left_padded_generate_equals_one_by_one(model):
    prompts = [ids(1, n, seed=20 + n)[0] for n in (7, 3, 5)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p) :] = p
    mask = left_pad_mask([len(p) for p in prompts], T)
    together = _greedy(model, batch, mask)[:, T:]
    for i, p in enumerate(prompts):
        alone = _greedy(model, p[None])[:, len(p) :]
        assert torch.equal(together[i], alone[0]), f"prompt {i}"


def test_greedy_generate_matches_reference_argmax(model, ref):
    sd, cfg = ref
    seq = ids(1, 5, seed=30)
    generated = _greedy(model, seq, n=8)
    for _ in range(8):
        nxt = reference_forward(sd, cfg, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_sampling_with_and_without_cache_agree(model):
    x = ids(2, 5, seed=31)
    torch.manual_seed(0)
    a = model.generate(x, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    b = model.generate(x, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None,
                       use_cache=False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    x = ids(2, 12, seed=40)
    grads = []
    for checkpointing in (False, True):
        model = QWenLMHeadModel.from_pretrained(ckpt).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-6, msg=name)


def test_bf16_keeps_norm_and_rotary_in_fp32(ckpt):
    model32 = QWenLMHeadModel.from_pretrained(ckpt)
    model16 = QWenLMHeadModel.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16
    x = ids(1, 40, seed=41)
    with torch.no_grad():
        a, b = model32(x).logits, model16(x).logits.float()
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


# ---------------------------------------------------------------- loading and saving


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert "transformer.h.0.attn.c_attn.bias" in keys and "lm_head.weight" in keys
    again = QWenLMHeadModel.from_pretrained(tmp_path / "saved")
    x = ids(1, 9, seed=50)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=0, rtol=0)


def test_sharded_checkpoint_loads_the_same(model, tmp_path, byte_vocab_file):
    sd = random_qwen_state_dict(tiny_qwen_config(vocab_size=VOCAB, seq_length=SEQ_LENGTH), seed=1, bias_std=0.05)
    path = write_tiny_qwen_checkpoint(
        tmp_path / "sharded", state_dict=sd, num_shards=3, vocab_size=VOCAB, seq_length=SEQ_LENGTH,
        vocab_file=byte_vocab_file,
    )
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    sharded = QWenLMHeadModel.from_pretrained(path)
    x = ids(1, 9, seed=51)
    with torch.no_grad():
        torch.testing.assert_close(sharded(x).logits, model(x).logits, atol=0, rtol=0)


def test_official_config_fields_are_accepted(ckpt):
    cfg = QWenConfig.from_pretrained(ckpt)
    assert cfg.use_flash_attn == "auto" and cfg.seq_length == SEQ_LENGTH and cfg.no_bias is True
    legacy = QWenConfig(n_embd=64, n_head=4, n_layer=3, ffn_hidden_size=128)
    shape = (legacy.hidden_size, legacy.num_attention_heads, legacy.num_hidden_layers, legacy.intermediate_size)
    assert shape == (64, 4, 3, 128)


def test_missing_folder_and_files_are_clear_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        QWenLMHeadModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        QWenLMHeadModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        QWenLMHeadModel.from_pretrained(tmp_path / "empty")


def _copy_with(ckpt, dest, config_changes=None, edit_weights=None):
    dest.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(config_changes or {})
    (dest / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(ckpt / "model.safetensors"))
    if edit_weights:
        edit_weights(sd)
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_config_that_does_not_match_the_weights_is_an_error(ckpt, tmp_path):
    bad = _copy_with(ckpt, tmp_path / "bad", {"intermediate_size": 128})
    with pytest.raises(ValueError, match="mlp.w1.weight"):
        QWenLMHeadModel.from_pretrained(bad)


def test_missing_and_unexpected_tensors_are_named(ckpt, tmp_path):
    missing = _copy_with(ckpt, tmp_path / "missing", edit_weights=lambda sd: sd.pop("transformer.h.1.ln_2.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*transformer\.h\.1\.ln_2\.weight"):
        QWenLMHeadModel.from_pretrained(missing)
    extra = _copy_with(ckpt, tmp_path / "extra",
                       edit_weights=lambda sd: sd.update({"transformer.h.0.attn.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*transformer\.h\.0\.attn\.extra"):
        QWenLMHeadModel.from_pretrained(extra)


def test_token_weighted_loss_across_micro_batches(ckpt):
    """With num_items_in_batch (what the Trainer passes), two micro-batches with different numbers of supervised
    tokens give exactly the gradient of the whole batch: every token weighs the same."""
    model = QWenLMHeadModel.from_pretrained(ckpt).train()
    x = ids(4, 10, seed=60)
    labels = x.clone()
    labels[0, :8] = -100  # 1 supervised token in row 0, 9 in each other row
    labels[1, :2] = -100
    model(x, labels=labels).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    for rows in (slice(0, 2), slice(2, 4)):
        model(x[rows], labels=labels[rows], num_items_in_batch=n_items).loss.backward()
    for name, grad in whole.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-7, rtol=1e-5, msg=name)
    # the mean of the two micro-batch means is a different objective: it would not match
    model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        (model(x[rows], labels=labels[rows]).loss / 2).backward()
    assert (model.get_parameter("lm_head.weight").grad - whole["lm_head.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize("rot_dim", [8, 4])
def test_apply_rotary_rotates_the_first_channels_and_passes_the_rest(rot_dim):
    """Each rotated pair (i, i + rot_dim/2) turns by its position's angle; channels past rot_dim (rotary_pct < 1)
    are returned as they were. Computed channel by channel, independently of the module's tensor formula."""
    t = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(0))  # [B, T, H, D]
    inv_freq = rotary_inv_freq(rot_dim, 10000.0, 1.0)
    cos, sin = rotary_cos_sin(torch.arange(5), inv_freq[None])
    out = apply_rotary(t, cos, sin)
    half = rot_dim // 2
    expected = t.clone()
    for pos in range(5):
        for i in range(half):
            angle = pos * inv_freq[i]
            a, b = t[:, pos, :, i], t[:, pos, :, i + half]
            expected[:, pos, :, i] = a * torch.cos(angle) - b * torch.sin(angle)
            expected[:, pos, :, i + half] = b * torch.cos(angle) + a * torch.sin(angle)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[..., rot_dim:], t[..., rot_dim:]) and out.shape == t.shape
