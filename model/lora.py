"""LoRA on the LLM (explicit targets, printed), the projector trainable, CLIP frozen."""

from __future__ import annotations

import warnings

import peft
import torch
from torch import nn

from settings import DEFAULT_LORA_TARGETS

# Target names are matched as suffixes of module paths; CLIP's modules are q_proj, k_proj, v_proj, out_proj,
# fc1, fc2 and the projector's linear_1/linear_2, so nothing outside QWen's blocks matches ours.
EMBEDDING_MODULES = ("wte", "lm_head")


def apply_lora(
    model: nn.Module,
    *,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS,
    train_embeddings: bool = False,
    verbose: bool = True,
):
    """Wrap `model` (a QWenVLForCausalLM) with PEFT LoRA; returns the PeftModel.

    Only LoRA weights, the projector and, with `train_embeddings`, full copies of `wte`/`lm_head` (needed
    when starting from the base Qwen-7B, whose ChatML tokens were never trained) require grad afterwards.
    """
    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.startswith("transformer.h.")}
    unknown = [t for t in target_modules if t not in available]
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} match no module of QWen's blocks (available: {sorted(available)})")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(EMBEDDING_MODULES) if train_embeddings else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.get_peft_model(model, config)
    base = peft_model.get_base_model()
    base.projector.requires_grad_(True)
    for name, p in peft_model.named_parameters():  # trained copies of wte/lm_head: fp32 master weights too
        if p.requires_grad and "modules_to_save" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    if base.vision_tower is not None:
        base.vision_tower.requires_grad_(False)
    if verbose:
        print(f"LoRA targets: {sorted(config.target_modules)} (r={r}, alpha={alpha}, dropout={dropout})"
              + (f"; full copies trained: {list(EMBEDDING_MODULES)}" if train_embeddings else ""))
        peft_model.print_trainable_parameters()
        n_proj = sum(getattr(p, "ds_numel", p.numel()) for p in base.projector.parameters())  # (ZeRO-3: a shard)
        print(f"projector parameters (trainable, own learning rate): {n_proj:,}")
    return peft_model
