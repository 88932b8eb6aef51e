"""Activation checkpointing with LoRA: the same gradients as without it, on text-only and mixed batches, whatever
checkpoint options are given, without relying on a hook that makes the embeddings require grad."""

from __future__ import annotations

import copy

import pytest
import torch

from model import apply_lora, build_vlm
from qwen import IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def lora_model(tiny_llm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    peft_model = apply_lora(build_vlm(tiny_llm_dir, tiny_clip_dir), r=4, alpha=8, dropout=0.0, verbose=False)
    for name, p in peft_model.named_parameters():  # LoRA B starts at zero: give the adapter a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return peft_model


def lora_gradients(lora_model, batch, checkpointing):
    peft_model = copy.deepcopy(lora_model)
    model = peft_model
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        model.get_input_embeddings()._forward_hooks.clear()  # correct by construction, not thanks to this hook
    peft_model.train()
    loss = peft_model(**batch).loss
    assert loss.requires_grad, "the loss has no graph"
    loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}


def make_batch(n_img, with_image):
    text = [10, 11, 12, 13, 14, 15, 16, 17] + [0] * n_img
    rows = [[10, 11] + [IMAGE_TOKEN_ID] * n_img + [12, 13, 14, 15, 16, 17], text] if with_image else [text, text[::-1]]
    ids = torch.tensor(rows)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    if with_image:
        batch["pixel_values"] = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    return batch


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "mixed"])
@pytest.mark.parametrize("options", [{}, {"preserve_rng_state": True}], ids=["default", "other-options"])
def test_lora_gradients_equal_without_checkpointing(lora_model, with_image, options):
    batch = make_batch(lora_model.vision_tower.num_patches, with_image)
    plain = lora_gradients(lora_model, batch, None)
    checkpointed = lora_gradients(lora_model, batch, options)
    assert set(plain) == set(checkpointed)
    assert any(n.startswith("projector.") for n in plain) == with_image  # a text-only batch leaves the projector alone
    assert any(float(g.abs().max()) > 0 for n, g in plain.items() if "lora_A" in n)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_reentrant_checkpointing_is_refused(lora_model):
    model = copy.deepcopy(lora_model)
    with pytest.raises(ValueError, match="use_reentrant=True is not supported"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
