"""Training data: unified samples → ChatML token ids with image placeholders and labels → padded batches.

- `dataset.conversation`: ChatML encoding, image-tag expansion, label mask and its consistency check, the
  inference prompt (pure Python, no torch);
- `dataset.dataset`: `SupervisedDataset` over the processed JSON Lines, and `DataCollator` (padding, attention
  mask from lengths);
- `dataset.sampler`: `LengthGroupedSampler`, `padding_efficiency`;
- `dataset.preflight`: `python -m dataset.preflight --config config.yaml`.

The torch-based names load on first use, so that `import dataset.conversation` does not import torch.
"""

from common.lazy import lazy_exports

from .conversation import (
    IGNORE_INDEX,
    EncodedConversation,
    SampleTooLongError,
    build_prompt_ids,
    check_encoding,
    encode_conversation,
    encode_user_text,
)

__getattr__ = lazy_exports(__name__, {
    "SupervisedDataset": ".dataset",
    "DataCollator": ".dataset",
    "NoUsableSampleError": ".dataset",
    "LengthGroupedSampler": ".sampler",
    "padding_efficiency": ".sampler",
})

__all__ = [
    "IGNORE_INDEX",
    "DataCollator",
    "EncodedConversation",
    "LengthGroupedSampler",
    "NoUsableSampleError",
    "SampleTooLongError",
    "SupervisedDataset",
    "build_prompt_ids",
    "check_encoding",
    "encode_conversation",
    "encode_user_text",
    "padding_efficiency",
]
