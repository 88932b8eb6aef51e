"""LoRA on the language model (explicit targets, printed), the projector trainable, the vision tower frozen.

LoRA wraps the language model alone (`VisionLanguageModel.language_model` becomes a peft model of it), so the
adapter a bundle holds is an adapter of the plain base LLM: `PeftModel.from_pretrained(llm, bundle)` loads it
without this project. The default targets are the family's (llm/): QWen v1's c_attn, c_proj, w1, w2; Qwen2 /
Qwen3's q/k/v/o and gate/up/down projections.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import peft
import torch

from .modeling_vlm import VisionLanguageModel


def apply_lora(
    model: VisionLanguageModel,
    *,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    train_embeddings: bool = False,
    verbose: bool = True,
) -> VisionLanguageModel:
    """Wrap `model.language_model` with PEFT LoRA; returns `model`.

    Only LoRA weights, the projector and, with `train_embeddings`, full copies of the input embeddings and the
    LM head (needed when starting from a base model, whose ChatML tokens were never trained) require grad
    afterwards; when the base model ties the two, they stay tied (one trained copy). `target_modules` None: the
    family's default targets.
    """
    family = model.text_family
    targets = list(family.lora_targets if target_modules is None else target_modules)
    prefix = family.layers + "."
    available = {name.rsplit(".", 1)[-1] for name, _ in model.llm.named_modules() if name.startswith(prefix)}
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} match no module of the {family.name} layers "
                         f"(available: {sorted(available)})")
    tied = train_embeddings and bool(getattr(model.config, "tie_word_embeddings", False))
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(family.embedding_modules) if train_embeddings else None,
        # Tied input and output embeddings (Qwen2.5-1.5B, Qwen3-1.7B): one trained copy serves as both, as the one
        # matrix does in the base model, through saving, loading and merging (without this, peft trains two copies
        # that come apart).
        ensure_weight_tying=tied,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.language_model = peft.get_peft_model(model.language_model, config)
    model.projector.requires_grad_(True)
    for name, p in model.language_model.named_parameters():  # trained embedding copies: fp32 master weights too
        if p.requires_grad and "modules_to_save" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    model.vision_tower.requires_grad_(False)
    if verbose:
        print(f"LoRA targets: {sorted(config.target_modules)} (r={r}, alpha={alpha}, dropout={dropout})"
              + (f"; full copies trained: {list(family.embedding_modules)}" if train_embeddings else "")
              + (" (tied: one copy serves as both)" if tied else ""))
        model.language_model.print_trainable_parameters()
        n_proj = sum(getattr(p, "ds_numel", p.numel()) for p in model.projector.parameters())  # (ZeRO-3: a shard)
        print(f"projector parameters (trainable, own learning rate): {n_proj:,}")
    return model
