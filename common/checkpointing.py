"""Activation checkpointing is always non-reentrant in this project: QWen's own model (qwen/modeling_qwen.py), the
multimodal model of every language backbone (model/modeling_vlm.py) and train.py's check of the training options
(training/trainer.py) refuse `use_reentrant=True` with this one message."""

from __future__ import annotations


def non_reentrant(activation_checkpointing_kwargs: dict | None) -> dict:
    """A copy of the kwargs with `use_reentrant=False` (torch's own default, reentrant, never applies). ValueError if
    they ask for use_reentrant=True: reentrant checkpointing needs an input that requires grad (with frozen
    embeddings a text-only batch would give a loss without a graph) and under DDP marks LoRA weights ready twice."""
    kwargs = dict(activation_checkpointing_kwargs or {})
    if kwargs.get("use_reentrant", False):
        raise ValueError(
            "activation checkpointing with use_reentrant=True is not supported (reentrant checkpointing loses the "
            "graph of text-only batches with frozen embeddings and breaks DDP with LoRA): leave use_reentrant out"
        )
    kwargs["use_reentrant"] = False
    return kwargs
