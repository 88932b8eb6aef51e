"""Training data: unified samples → ChatML token ids with image placeholders and labels → padded batches.

- `dataset.conversation`: ChatML encoding, image-tag expansion, label mask and its consistency check
  (pure Python, no torch);
- `dataset.dataset`: `SupervisedDataset` over the processed JSON Lines;
- `dataset.collator`: `DataCollator`, padding and attention mask from lengths;
- `dataset.sampler`: `LengthGroupedSampler`, `padding_efficiency`;
- `dataset.preflight`: `python -m dataset.preflight --config config.yaml`.

The names below are imported on first use, so that `import dataset.conversation` (or the demo's
`dataset.synthetic`) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "dataset.conversation",
    "IMAGE_TAG": "dataset.conversation",
    "EncodedConversation": "dataset.conversation",
    "SampleTooLongError": "dataset.conversation",
    "build_prompt_ids": "dataset.conversation",
    "check_encoding": "dataset.conversation",
    "encode_conversation": "dataset.conversation",
    "encode_user_text": "dataset.conversation",
    "num_image_tokens_from_clip_config": "dataset.conversation",
    "SupervisedDataset": "dataset.dataset",
    "DataCollator": "dataset.collator",
    "LengthGroupedSampler": "dataset.sampler",
    "padding_efficiency": "dataset.sampler",
}

__all__ = [
    "IGNORE_INDEX", "IMAGE_TAG", "EncodedConversation", "SampleTooLongError", "build_prompt_ids",
    "check_encoding", "encode_conversation", "encode_user_text", "num_image_tokens_from_clip_config",
    "SupervisedDataset", "DataCollator", "LengthGroupedSampler", "padding_efficiency",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dataset' has no attribute {name!r}")
