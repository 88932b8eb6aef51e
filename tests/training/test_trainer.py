"""The Trainer's own pieces: the optimizer's parameter groups and learning rates, the bundle under DeepSpeed."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from model import apply_lora, build_vlm, save_bundle, vlm_config_for
from training.distributed import full_trainable_weights
from training.trainer import build_param_groups


def test_optimizer_groups_and_learning_rates(tiny_llm_dir, tiny_clip_dir):
    model = apply_lora(build_vlm(tiny_llm_dir, tiny_clip_dir), r=4, alpha=8, train_embeddings=True, verbose=False)
    groups = {g["name"]: g for g in build_param_groups(model, learning_rate=1e-4, projector_learning_rate=1e-3,
                                                        weight_decay=0.1, verbose=False)}
    assert set(groups) == {"llm/decay", "projector/decay", "projector/no_decay"}
    assert groups["llm/decay"]["lr"] == 1e-4 and groups["llm/decay"]["weight_decay"] == 0.1
    assert groups["projector/decay"]["lr"] == 1e-3 and groups["projector/decay"]["weight_decay"] == 0.1
    assert groups["projector/no_decay"]["lr"] == 1e-3 and groups["projector/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["projector/no_decay"]["params"])
    named = {id(p): n for n, p in model.named_parameters()}
    llm_names = [named[id(p)] for p in groups["llm/decay"]["params"]]
    # LoRA matrices plus the trainable copies of wte and lm_head (train_embeddings), nothing else
    assert all("lora_" in n or "modules_to_save" in n for n in llm_names)
    assert sum("modules_to_save" in n for n in llm_names) == 2
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(p.requires_grad for p in model.parameters())


def test_optimizer_groups_take_the_whole_shape_of_a_zero3_shard(tiny_llm_dir, tiny_clip_dir):
    """DeepSpeed ZeRO-3 loads the weights as flat shards (empty here, on a process that holds none of a tensor) and
    keeps the whole shape in `ds_shape`: every trained tensor lands in the group it lands in unsharded (the LoRA and
    projector matrices decay, the projector's biases do not)."""
    model = apply_lora(build_vlm(tiny_llm_dir, tiny_clip_dir), r=4, alpha=8, verbose=False)

    def grouped() -> dict[str, list[str]]:
        named = {id(p): n for n, p in model.named_parameters()}
        return {g["name"]: sorted(named[id(p)] for p in g["params"]) for g in build_param_groups(
            model, learning_rate=1e-4, projector_learning_rate=1e-3, weight_decay=0.1, verbose=False)}

    whole = grouped()
    assert len(whole["projector/decay"]) == len(whole["projector/no_decay"]) == 2 and whole["llm/decay"]
    for p in model.parameters():
        if p.requires_grad:
            p.ds_shape, p.ds_numel = p.shape, p.numel()
            p.data = torch.empty(0)
    assert grouped() == whole


@pytest.mark.parametrize("llm, vision, copies", [("tiny_llm_dir", "tiny_clip_dir", 2),
                                                 ("tiny_qwen3_tied_dir", "tiny_siglip_dir", 1)])
def test_a_deepspeed_bundle_is_the_one_the_whole_model_writes(request, monkeypatch, tmp_path, llm, vision, copies):
    """Under DeepSpeed the Trainer's bundle comes from the optimizer's fp32 masters, gathered whole
    (`full_trainable_weights`), as the model's own parameters are shards (ZeRO-3: empty on a process that holds
    none of a tensor) or low-precision copies. Here the gather is DeepSpeed's function stood in for by one that
    hands back each parameter's value, and the model is then sharded: the bundle is the one the whole model writes,
    bit for bit (the adapter named relative to the language model, with the trained embedding copies, one of them
    Qwen3-1.7B's tied one under both its names; the projector without its prefix), each tensor gathered once. A
    state_dict lacking one of them is refused, naming it, before anything is written."""
    llm_dir, vision_dir = request.getfixturevalue(llm), request.getfixturevalue(vision)
    model = apply_lora(build_vlm(llm_dir, vision_dir), r=4, alpha=8, train_embeddings=True, verbose=False)
    torch.manual_seed(1)
    for p in model.parameters():  # LoRA B starts at zero: give every trained tensor a value
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    config = vlm_config_for(model, llm_dir, vision_dir, "x")
    save_bundle(model, tmp_path / "whole", config)

    gathered: list[torch.nn.Parameter] = []
    fake = types.ModuleType("deepspeed.utils")
    fake.safe_get_full_fp32_param = lambda p: gathered.append(p) or p.detach().clone()
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    weights = full_trainable_weights(model, None, deepspeed=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(gathered) == len(trained) and {id(p) for p in gathered} == {id(p) for p in trained}
    assert sum("modules_to_save" in name for name in weights) == 2
    assert len({id(p) for p in trained if p.ndim == 2 and p.shape[0] > 1000}) == copies  # the embedding copies
    for p in trained:
        p.data = torch.empty(0)
    save_bundle(model, tmp_path / "sharded", config, state_dict=weights)
    whole, sharded = bundle_tensors(tmp_path / "whole"), bundle_tensors(tmp_path / "sharded")
    assert whole.keys() == sharded.keys() and len(whole) > 4
    for key, tensor in whole.items():
        assert torch.equal(sharded[key], tensor), key

    for name in ("projector.linear_2.bias", next(n for n in weights if "lora_B" in n),
                 next(n for n in weights if "lm_head.modules_to_save" in n)):
        with pytest.raises(ValueError, match=re.escape(name.split(".", 1)[1])):
            save_bundle(model, tmp_path / "partial", config, state_dict={k: v for k, v in weights.items() if k != name})
        assert not (tmp_path / "partial").exists()


def bundle_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a bundle's files, as `file/name`."""
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_checkpoint_of_another_lora_shape_is_refused_naming_each_difference(tiny_llm_dir, tiny_clip_dir,
                                                                             tiny_bundle_dir):
    # the bundle: r 4, alpha 8 on QWen v1's default targets, no trained embeddings
    from model.bundle import check_compatible

    def lora_model(**options):
        model = build_vlm(tiny_llm_dir, tiny_clip_dir)
        return model, apply_lora(model, verbose=False, **{"r": 4, "alpha": 8, **options})

    model, same = lora_model(target_modules=["w2", "w1", "c_proj", "c_attn"])  # (the order does not matter)
    check_compatible(tiny_bundle_dir, vlm_config_for(model, tiny_llm_dir, tiny_clip_dir, "x"), same)
    model, other = lora_model(r=8, target_modules=["c_attn"], train_embeddings=True)
    with pytest.raises(ValueError) as e:
        check_compatible(tiny_bundle_dir, vlm_config_for(model, tiny_llm_dir, tiny_clip_dir, "x"), other)
    problems = str(e.value).split(": ", 1)[1].split("; ")
    assert problems[0] == "LoRA r: checkpoint 4 vs now 8"
    assert problems[1] == "LoRA target_modules: checkpoint ['c_attn', 'c_proj', 'w1', 'w2'] vs now ['c_attn']"
    assert problems[2].startswith("LoRA modules_to_save: checkpoint [] vs now [") and len(problems) == 3
