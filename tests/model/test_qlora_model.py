"""The multimodal model with a 4-bit LLM (`build_vlm(..., quantization="nf4")`): only the LLM's layers are 4-bit,
LoRA trains in fp32 on them, and (non-reentrant) activation checkpointing gives the same LoRA and projector
gradients, text-only batches included, without the input-grad hook peft's prepare_model_for_kbit_training adds."""

from __future__ import annotations

import pytest
import torch

from model import apply_lora, build_vlm, vlm_config_for


@pytest.fixture(scope="module")
def qwen64_dir(tmp_path_factory):
    from qwen.tiny import write_tiny_qwen_checkpoint

    return write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen64") / "tiny-qwen", seed=3, bias_std=0.02,
                                      hidden_size=64, intermediate_size=256)


@pytest.fixture()
def qlora(qwen64_dir, tiny_clip_dir):
    model = build_vlm(qwen64_dir, tiny_clip_dir, quantization="nf4")
    apply_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # (fresh LoRA B is zero: A would get no gradient)
    return model


def test_only_the_llm_layers_are_4bit_and_the_trained_weights_are_fp32(qlora, qwen64_dir, tiny_clip_dir):
    quantised = {n for n, p in qlora.named_parameters() if hasattr(p, "quant_state")}
    assert quantised and all(n.startswith("language_model.") and ".base_layer." in n for n in quantised)
    trained = {n: p for n, p in qlora.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"language_model", "projector"}
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert all(("lora_" in n) for n in trained if n.startswith("language_model."))
    config = vlm_config_for(qlora, qwen64_dir, tiny_clip_dir)
    assert config.text.quantization == "nf4" and config.identity()["text.quantization"] == "nf4"


def grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "image"])
def test_activation_checkpointing_gives_the_same_gradients(qlora, with_image):
    n_image = qlora.vision_tower.num_patches
    ids = torch.randint(0, 200, (2, 12 + (n_image if with_image else 0)), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if with_image:
        ids[:, 2:2 + n_image] = qlora.image_token_id
        batch["labels"][:, : 2 + n_image] = -100
        batch["pixel_values"] = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    qlora.train()
    plain = grads(qlora, batch)
    qlora.activation_checkpointing_enable()
    assert qlora.is_activation_checkpointing
    checkpointed = grads(qlora, batch)
    lora = [n for n, p in qlora.named_parameters() if p.requires_grad and "lora_" in n]
    assert set(plain) == set(checkpointed) and set(lora) <= set(plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
        assert plain[name].abs().sum() > 0, name
    assert ("projector.linear_1.weight" in plain) == with_image


def test_a_bundle_config_says_its_quantization(tiny_bundle_dir, tmp_path):
    """An older bundle (no `text.quantization`) reads as full precision; an unknown value is refused naming it."""
    import json
    import shutil

    from model import VLMConfig
    from settings import ConfigError

    assert VLMConfig.load(tiny_bundle_dir).text.quantization == "none"
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, folder)
    raw = json.loads((folder / "vlm_config.json").read_text())
    raw["text"].pop("quantization", None)
    (folder / "vlm_config.json").write_text(json.dumps(raw))
    assert VLMConfig.load(folder).text.quantization == "none"
    raw["text"]["quantization"] = "int4"
    (folder / "vlm_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="text.quantization 'int4' is not one of: none, nf4"):
        VLMConfig.load(folder)
