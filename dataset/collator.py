"""Items of `SupervisedDataset` → one padded batch, with keys named like the model's forward arguments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataset.conversation import IGNORE_INDEX

IMAGE_KEYS = ("pixel_values", "image_features")  # per-sample image tensors, concatenated along dim 0


@dataclass
class DataCollator:
    """Pad `input_ids` with pad_token_id and `labels` with -100 to the longest item (rounded up to
    pad_to_multiple_of), on the right for training or on the left for batched generation.

    `attention_mask` is 1 on each item's own tokens, from its length: never `ids != pad`, since the
    pad id is `<|endoftext|>`, a real token that may end a sample. Image tensors of all items are
    concatenated in item order (each item's rows are already in tag order), matching the order of the
    placeholder runs in the flattened batch; the key is left out when no item has an image.
    """

    pad_token_id: int = 151643  # <|endoftext|>: Qwen has no pad token
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
        lengths = [len(x) for x in ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = {
            "input_ids": self._pad(ids, width, self.pad_token_id),  # [B, T]
            "attention_mask": self._pad([torch.ones(n, dtype=torch.long) for n in lengths], width, 0),  # [B, T]
        }
        has_labels = ["labels" in item for item in items]
        if any(has_labels):
            if not all(has_labels):
                raise ValueError("some items have labels and some do not")
            labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
            for i, (x, y) in enumerate(zip(ids, labels)):
                if x.shape != y.shape:
                    raise ValueError(f"item {i}: input_ids {tuple(x.shape)} but labels {tuple(y.shape)}")
            batch["labels"] = self._pad(labels, width, IGNORE_INDEX)  # [B, T]
        for key in IMAGE_KEYS:
            values = [item[key] for item in items if item.get(key) is not None]
            if values:
                batch[key] = torch.cat(values, dim=0)  # [sum of n_images, ...]
        return batch

    def _pad(self, rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row):] = row
        return out
