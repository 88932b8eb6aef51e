"""The multimodal model: splicing, generation with images, bundles, adapters, merged export."""

from __future__ import annotations

import json

import pytest
import torch

from model import apply_lora, build_vlm, load_vlm, save_bundle, vlm_config_for
from model.export import main as export_main
from qwen import IMAGE_TOKEN_ID, QWenLMHeadModel

PAD = 151643


@pytest.fixture(scope="module")
def vlm(tiny_llm_dir, tiny_clip_dir):
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    torch.manual_seed(0)
    for p in model.projector.parameters():  # a "trained" projector, so images visibly matter
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def n_img(vlm):
    return vlm.vision_tower.num_patches


def pixels(n, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def prompt(n_img, texts_and_images):
    """ids from a list like [[5, 6], "img", [7]]: "img" expands to n_img placeholders."""
    out = []
    for part in texts_and_images:
        out += [IMAGE_TOKEN_ID] * n_img if part == "img" else part
    return torch.tensor([out])


def manual_embeds(vlm, ids, pix):
    """Reference splice: a Python loop writing each image's projected rows at its placeholders, in order."""
    embeds = vlm.get_input_embeddings()(ids).clone()
    with torch.no_grad():
        feats = vlm.projector(vlm.vision_tower(pix)).reshape(-1, embeds.shape[-1]) if pix is not None else None
    k = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == IMAGE_TOKEN_ID:
                embeds[b, t] = feats[k]
                k += 1
    assert feats is None or k == feats.shape[0]
    return embeds


def test_logits_equal_qwen_on_hand_built_embeddings(vlm, tiny_llm_dir, n_img):
    qwen = QWenLMHeadModel.from_pretrained(tiny_llm_dir).eval()
    ids = prompt(n_img, [[10, 11, 12], "img", [13, 14]])
    pix = pixels(1)
    with torch.no_grad():
        ours = vlm(ids, pixel_values=pix).logits
        expected = qwen(inputs_embeds=manual_embeds(vlm, ids, pix)).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_two_images_land_in_order(vlm, n_img):
    ids = prompt(n_img, [[10], "img", [11, 12], "img", [13]])
    pix = pixels(2, seed=1)
    with torch.no_grad():
        ours = vlm(ids, pixel_values=pix).logits
        swapped = vlm(ids, pixel_values=pix.flip(0)).logits
        expected = vlm(inputs_embeds=manual_embeds(vlm, ids, pix)).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert (ours - swapped).abs().max() > 1e-3


def test_text_only_is_unchanged_and_mixes_with_images(vlm, tiny_llm_dir, n_img):
    qwen = QWenLMHeadModel.from_pretrained(tiny_llm_dir).eval()
    text = torch.tensor([[20, 21, 22, 23]])
    with torch.no_grad():
        torch.testing.assert_close(vlm(text).logits, qwen(text).logits, atol=0, rtol=0)
        # batch: an image sample and a right-padded text-only sample
        img = prompt(n_img, [[10], "img", [11]])
        T = img.shape[1]
        batch = torch.full((2, T), PAD)
        batch[0] = img[0]
        batch[1, :4] = text[0]
        mask = torch.zeros(2, T, dtype=torch.long)
        mask[0], mask[1, :4] = 1, 1
        out = vlm(batch, attention_mask=mask, pixel_values=pixels(1, seed=2)).logits
        torch.testing.assert_close(out[1, :4], qwen(text).logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[0:1], vlm(img, pixel_values=pixels(1, seed=2)).logits, atol=1e-5, rtol=1e-4)


def test_placeholder_count_mismatch_raises(vlm, n_img):
    ids = prompt(n_img, [[10], "img", [11]])
    with pytest.raises(ValueError, match=rf"placeholder tokens \({n_img}\) != image feature rows \(2 images"):
        vlm(ids, pixel_values=pixels(2))
    with pytest.raises(ValueError, match="no images were given"):
        vlm(ids)
    short = ids[:, :-3]  # a run cut short
    with pytest.raises(ValueError, match=rf"\({n_img - 2}\)"):
        vlm(short, pixel_values=pixels(1))


def test_precomputed_features_equal_pixels(vlm, n_img):
    ids = prompt(n_img, [[10], "img", [11]])
    pix = pixels(1, seed=3)
    with torch.no_grad():
        a = vlm(ids, pixel_values=pix).logits
        b = vlm(ids, patch_features=vlm.vision_tower(pix)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_batched_generation_with_images_equals_one_by_one(vlm, n_img):
    prompts = [prompt(n_img, [[10, 11], "img", [12]])[0], prompt(n_img, [[13], "img", [14, 15, 16], "img", [17]])[0],
               torch.tensor([18, 19, 20])]
    images = [pixels(1, seed=4), pixels(2, seed=5), None]
    T = max(len(p) for p in prompts)
    batch = torch.full((3, T), PAD)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    together = vlm.generate(batch, attention_mask=mask, pixel_values=torch.cat([images[0], images[1]]), **kw)[:, T:]
    for i, p in enumerate(prompts):
        extra = {"pixel_values": images[i]} if images[i] is not None else {}
        alone = vlm.generate(p[None], **extra, **kw)[:, len(p):]
        assert torch.equal(together[i], alone[0]), f"prompt {i}"


def test_generation_splices_images_on_prefill_only(vlm, n_img):
    calls = []
    hook = vlm.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        vlm.generate(prompt(n_img, [[10], "img"]), pixel_values=pixels(1), max_new_tokens=4, do_sample=False,
                     pad_token_id=PAD, eos_token_id=None)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_gradient_checkpointing_never_reruns_the_tower(tiny_llm_dir, tiny_clip_dir, n_img):
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, verbose=False)
    model.activation_checkpointing_enable()
    peft_model.train()
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    ids = prompt(n_img, [[10], "img", [11, 12]])
    out = peft_model(input_ids=ids, pixel_values=pixels(1), labels=ids.masked_fill(ids == IMAGE_TOKEN_ID, -100))
    out.loss.backward()
    assert len(calls) == 1
    assert model.projector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_only_lora_and_projector_require_grad(tiny_llm_dir, tiny_clip_dir):
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, verbose=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert "projector.linear_2.weight" in trainable
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert targets == {"c_attn", "c_proj", "w1", "w2"}
    assert sum("mlp.c_proj.lora_A" in n for n in trainable) == 2
    assert sum("attn.c_proj.lora_A" in n for n in trainable) == 2


def _trained_bundle(tiny_llm_dir, tiny_clip_dir, folder, train_embeddings=False):
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, train_embeddings=train_embeddings, verbose=False)
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():  # LoRA B starts at zero: give every trainable tensor a value
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2 if "lora_" in n or "projector" in n else 0.05)
    peft_model.eval()
    save_bundle(peft_model, folder, vlm_config_for(model, tiny_llm_dir, tiny_clip_dir, "You are a test."))
    return peft_model


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_bundle_reloads_to_equal_logits(tiny_llm_dir, tiny_clip_dir, tmp_path, n_img, train_embeddings):
    trained = _trained_bundle(tiny_llm_dir, tiny_clip_dir, tmp_path / "b", train_embeddings)
    ids, pix = prompt(n_img, [[10, 11], "img", [12, 13]]), pixels(1, seed=6)
    with torch.no_grad():
        expected = trained(input_ids=ids, pixel_values=pix).logits
        for merge in (False, True):
            again, cfg = load_vlm(tmp_path / "b", merge_lora=merge)
            torch.testing.assert_close(again.eval()(input_ids=ids, pixel_values=pix).logits, expected,
                                       atol=1e-5, rtol=1e-4)
    assert cfg.system_prompt == "You are a test." and cfg.vision.num_image_tokens == n_img
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_adapter_loads_on_plain_qwen_with_peft(tiny_llm_dir, tiny_clip_dir, tmp_path):
    from peft import PeftModel

    trained = _trained_bundle(tiny_llm_dir, tiny_clip_dir, tmp_path / "b")
    qwen = PeftModel.from_pretrained(QWenLMHeadModel.from_pretrained(tiny_llm_dir), str(tmp_path / "b")).eval()
    text = torch.tensor([[30, 31, 32, 33, 34]])
    with torch.no_grad():
        torch.testing.assert_close(qwen(input_ids=text).logits, trained(input_ids=text).logits, atol=1e-5, rtol=1e-4)
        base = QWenLMHeadModel.from_pretrained(tiny_llm_dir).eval()(text).logits
    assert (qwen(input_ids=text).logits - base).abs().max() > 1e-3  # the adapter really changed something


def test_merged_export_equals_adapter_and_loads_without_peft(tiny_llm_dir, tiny_clip_dir, tmp_path, n_img):
    trained = _trained_bundle(tiny_llm_dir, tiny_clip_dir, tmp_path / "b", train_embeddings=True)
    assert export_main(["--checkpoint", str(tmp_path / "b"), "--output", str(tmp_path / "out"),
                        "--max-shard-gb", "0.01"]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_llm_dir / "config.json").read_text())
    ids, pix = prompt(n_img, [[10, 11], "img", [12]]), pixels(1, seed=7)
    with torch.no_grad():
        expected = trained(input_ids=ids, pixel_values=pix).logits
        merged, cfg = load_vlm(out)
        torch.testing.assert_close(merged.eval()(ids, pixel_values=pix).logits, expected, atol=1e-5, rtol=1e-4)
        # the QWen part alone, read by the plain QWen loader: the merged LLM's logits
        qwen = QWenLMHeadModel.from_pretrained(out).eval()
        text = torch.tensor([[40, 41, 42]])
        torch.testing.assert_close(qwen(text).logits, trained(input_ids=text).logits, atol=1e-5, rtol=1e-4)
    assert cfg.merged and cfg.text.path == "." and cfg.vision.path == "vision"
    assert export_main(["--checkpoint", str(tmp_path / "b"), "--output", str(out)]) == 2  # refuses to overwrite


def test_missing_clip_folder_is_a_clear_error(tiny_llm_dir, tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        build_vlm(tiny_llm_dir, tmp_path / "nowhere")
