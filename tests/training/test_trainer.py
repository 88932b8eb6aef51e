"""The Trainer's own pieces: the optimizer's parameter groups and learning rates."""

from __future__ import annotations

from model import apply_lora, build_vlm
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
    import torch

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
