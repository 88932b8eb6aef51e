"""`lora.train_embeddings` on a Qwen2 / Qwen3 base model: the input embeddings and the LM head are trained as full
copies, the base weights stay as loaded, and where the base model ties the two (Qwen3-1.7B, Qwen2.5-1.5B) one trained
copy serves as both, through a training step, the bundle, loading and merging."""

from __future__ import annotations

import pytest
import torch

from model import apply_lora, build_vlm, load_vlm, save_bundle, vlm_config_for


def trained_copy(module: torch.nn.Module) -> torch.Tensor:
    """The weight a layer computes with: peft's trained copy where it has one, else its own."""
    return module.modules_to_save["default"].weight if hasattr(module, "modules_to_save") else module.weight


def batch(model):
    """Two rows of text with one image each (placeholders of the LLM's image token), every text token supervised."""
    n = model.vision_tower.num_patches
    ids = torch.tensor([[11, 12, *[model.image_token_id] * n, 13, 14, 15],
                        [21, *[model.image_token_id] * n, 22, 23, 24, 25]])
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


@pytest.mark.parametrize("llm, tied", [("tiny_qwen2_dir", False), ("tiny_qwen3_tied_dir", True)])
def test_train_embeddings_trains_both_copies_and_keeps_a_tie(request, llm, tied, tiny_siglip_dir, tmp_path):
    llm_dir = request.getfixturevalue(llm)
    model = apply_lora(build_vlm(llm_dir, tiny_siglip_dir), r=4, alpha=8, dropout=0.0, train_embeddings=True,
                       verbose=False)
    assert model.config.tie_word_embeddings is tied  # the layouts as published
    embed, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    base_embed, base_head = embed.original_module.weight.detach().clone(), head.original_module.weight.detach().clone()
    copies = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert len(copies) == (1 if tied else 2), copies
    assert (trained_copy(embed) is trained_copy(head)) is tied

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**batch(model)).loss.backward()
    optimizer.step()
    assert not torch.equal(trained_copy(embed), base_embed) and not torch.equal(trained_copy(head), base_head)
    assert torch.equal(embed.original_module.weight, base_embed) and torch.equal(head.original_module.weight, base_head)
    assert (trained_copy(embed) is trained_copy(head)) is tied  # the step moved the one shared copy

    save_bundle(model.eval(), tmp_path / "b", vlm_config_for(model, llm_dir, tiny_siglip_dir))
    probe = {k: v for k, v in batch(model).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**probe).logits
    for merge in (False, True):
        loaded, _ = load_vlm(tmp_path / "b", merge_lora=merge)
        embed_now, head_now = loaded.llm.get_input_embeddings(), loaded.llm.get_output_embeddings()
        assert (trained_copy(embed_now) is trained_copy(head_now)) is tied, f"merge={merge}"
        assert torch.equal(trained_copy(embed_now), trained_copy(embed).detach())
        assert torch.equal(trained_copy(head_now), trained_copy(head).detach())
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**probe).logits, expected, atol=1e-5, rtol=1e-4)
