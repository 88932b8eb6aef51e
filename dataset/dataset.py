"""The training dataset: unified samples (JSON Lines from process_image.py) → token ids, labels and pixels,
and the collator that pads its items into batches.

At construction the file is read once, every sample is checked and encoded without its images
(`lengths`, for the length-grouped sampler; samples truncated or too long for max_length are counted),
and the raw lines are kept in one byte buffer: DataLoader workers share it instead of copying
thousands of Python dicts. `__getitem__` re-encodes its sample (about a millisecond) and loads its images.

A sample whose image cannot be loaded at training time never stops a run: it is skipped in favour
of the next index that loads and named in a warning. It is left out only for the rest of the epoch (a
read error may be transient): the next epoch tries it again. `skipped` counts the skips of this process
and of its DataLoader workers together (a shared-memory counter, one slot per worker); the trainer adds
up the processes' counts in its training log. A file in which no sample loads at all raises
NoUsableSampleError.

Caption samples list every valid caption as `candidates`; the one trained on is chosen from
(seed, epoch, row of the sample in the file, turn), so that each epoch can see another caption and
a rerun sees the same ones. The epoch lives in shared memory, so `set_epoch` reaches DataLoader
workers, persistent ones included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from dataprocess.schema import read_samples
from dataset.conversation import IGNORE_INDEX, SampleTooLongError, encode_conversation
from llm import ChatTokenizer
from visual.images import ImageLoadError, load_image

logger = logging.getLogger(__name__)

ImageProcessor = Callable[[list[Image.Image]], torch.Tensor]  # N images → FloatTensor [N, 3, H, W]
FeatureLoader = Callable[[list[str]], torch.Tensor]  # N image paths → FloatTensor [N, tokens, C]


# --------------------------------------------------------------------------------------------------
# Caption candidates
# --------------------------------------------------------------------------------------------------


def candidate_choice(seed: int, epoch: int, row: int, turn: int, num_candidates: int) -> int:
    """Which candidate a turn uses: a stable hash of (seed, epoch, row, turn), the same in every process."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{row}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_candidates


def choose_candidates(turns: Sequence[dict[str, Any]], *, seed: int, epoch: int, row: int) -> list[dict[str, Any]]:
    """The turns with each `candidates` list replaced by one of its entries as `content`."""
    chosen = []
    for i, turn in enumerate(turns):
        candidates = turn.get("candidates")
        if candidates:
            turn = {"role": turn["role"], "content": candidates[candidate_choice(seed, epoch, row, i, len(candidates))]}
        chosen.append(turn)
    return chosen


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class NoUsableSampleError(ValueError):
    """A data file with no sample that can be used (empty, every sample too long for max_length, or none whose
    images load)."""


SKIP_SLOTS = 257  # skip counters: slot 0 for the process itself, 1 + worker id for its DataLoader workers


class SupervisedDataset(Dataset):
    """Samples of one JSONL file as {"input_ids", "labels", "pixel_values"} (or "patch_features").

    input_ids / labels: LongTensor [T] (labels -100 except answers, see dataset.conversation);
    pixel_values: FloatTensor [n_images, 3, H, W] from `image_processor`, or None without images.
    With `feature_loader` (image paths → [n_images, tokens, C]) images are not decoded and the key
    is "patch_features" instead; a loader that cannot serve an image raises ImageLoadError, and the
    sample is skipped like an unreadable image. Samples that cannot fit max_length are left out at construction
    (`unusable` lists their ids), and so are those for which `keep(sample)` is false (`num_filtered`; `keep` is
    used at construction only); `lengths[i]` is the token count of item i, placeholders included.
    """

    def __init__(
        self,
        jsonl_path: str | os.PathLike,
        tokenizer: ChatTokenizer,
        image_processor: ImageProcessor | None,
        *,
        num_image_tokens: int,
        system: str,
        max_length: int,
        seed: int = 0,
        feature_loader: FeatureLoader | None = None,
        keep: Callable[[dict[str, Any]], bool] | None = None,
    ):
        if image_processor is None and feature_loader is None:
            raise ValueError("SupervisedDataset needs an image_processor (or a feature_loader)")
        self.path = os.fspath(jsonl_path)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_loader = feature_loader
        self.num_image_tokens = num_image_tokens
        self.system = system
        self.max_length = max_length
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by DataLoader workers

        self.unusable: list[str] = []  # ids of samples whose first turn pair does not fit max_length
        self.num_truncated = 0  # samples kept with trailing turn pairs dropped
        self.num_filtered = 0  # samples left out by `keep` (the stage's filter: sources, and images in the align stage)
        self._skips = torch.zeros(SKIP_SLOTS, dtype=torch.int64).share_memory_()  # seen by the main process
        self._bad: set[int] = set()  # indices skipped in this process during epoch `_bad_epoch`
        self._bad_epoch = 0

        lines: list[bytes] = []
        rows: list[int] = []
        lengths: list[int] = []
        name = os.path.basename(self.path)
        for row, (lineno, line, sample) in enumerate(read_samples(self.path)):
            if keep is not None and not keep(sample):
                self.num_filtered += 1
                continue
            try:
                encoded = encode_conversation(
                    tokenizer, sample["turns"], system=system, num_image_tokens=num_image_tokens,
                    max_length=max_length, sample_id=f"{sample['id']} ({name}, line {lineno})",
                )
            except SampleTooLongError:
                self.unusable.append(sample["id"])
                continue
            self.num_truncated += encoded.dropped_turns > 0
            lines.append(line)
            rows.append(row)
            lengths.append(len(encoded.input_ids))

        self.lengths = lengths
        self._rows = np.asarray(rows, dtype=np.int64)
        self._offsets = np.cumsum([0] + [len(x) for x in lines], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(lines), dtype=np.uint8)
        if self.unusable or self.num_truncated:
            logger.warning(
                "%s: %d samples, %d truncated to max_length=%d (trailing turns dropped), %d left out (too long)",
                self.path, len(self), self.num_truncated, max_length, len(self.unusable),
            )
        if not len(self):
            raise NoUsableSampleError(f"{self.path}: no usable sample ({len(self.unusable)} too long for max_length="
                                      f"{max_length}, {self.num_filtered} left out by the sample filter: "
                                      "sources, images)")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @property
    def skipped(self) -> int:
        """Samples skipped at __getitem__ (an image that does not load), by this process and its DataLoader
        workers, over every epoch so far: a sample that fails in two epochs counts twice."""
        return int(self._skips.sum())

    def set_epoch(self, epoch: int) -> None:
        """Called each epoch (accelerate does it; see dataset.sampler under DDP): changes caption choices."""
        self._epoch.fill_(int(epoch))

    def sample(self, index: int) -> dict[str, Any]:
        """The raw unified sample behind item `index`."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._blob[start:end].tobytes())

    def encode(self, index: int):
        """Item `index`'s sample, its turns with this epoch's candidates, encoded (no images loaded)."""
        sample = self.sample(index)
        turns = choose_candidates(sample["turns"], seed=self.seed, epoch=self.epoch, row=int(self._rows[index]))
        encoded = encode_conversation(
            self.tokenizer, turns, system=self.system, num_image_tokens=self.num_image_tokens,
            max_length=self.max_length, sample_id=sample["id"],
        )
        return sample, encoded

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        if self._bad_epoch != self.epoch:  # a new epoch retries what failed in the last one
            self._bad.clear()
            self._bad_epoch = self.epoch
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except ImageLoadError as e:
                self._skip(i, f"image {e.path}: {e.reason}")
            except SampleTooLongError as e:  # a longer caption candidate than the one measured at init
                self._skip(i, str(e))
        raise NoUsableSampleError(f"{self.path}: no sample could be loaded (every image failed; see the warnings)")

    def _skip(self, index: int, why: str) -> None:
        self._bad.add(index)
        worker = get_worker_info()
        self._skips[0 if worker is None else 1 + worker.id % (SKIP_SLOTS - 1)] += 1
        logger.warning("%s: skipping sample %d (%s): %s", self.path, index, self.sample(index)["id"], why)

    def _load(self, index: int) -> dict[str, torch.Tensor | None]:
        sample, encoded = self.encode(index)
        paths = sample["images"][: encoded.num_images]
        item: dict[str, torch.Tensor | None] = {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
        }
        key = "patch_features" if self.feature_loader is not None else "pixel_values"
        if not paths:
            item[key] = None
            return item
        if self.feature_loader is not None:
            values = self.feature_loader(paths)  # [n_images, tokens, C]
        else:
            values = self.image_processor([load_image(p) for p in paths])  # [n_images, 3, H, W]
        if values.shape[0] != len(paths):
            raise ValueError(f"{sample['id']}: {len(paths)} images gave {key} of shape {tuple(values.shape)}")
        item[key] = values
        return item


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------

IMAGE_KEYS = ("pixel_values", "patch_features")  # per-sample image tensors, concatenated along dim 0


@dataclass
class DataCollator:
    """Pad `input_ids` with pad_token_id and `labels` with -100 to the longest item (rounded up to
    pad_to_multiple_of), on the right for training or on the left for batched generation.

    `attention_mask` is 1 on each item's own tokens, from its length: never `ids != pad`, since the
    pad id is `<|endoftext|>`, a real token that may end a sample. Image tensors of all items are
    concatenated in item order (each item's rows are already in tag order), matching the order of the
    placeholder runs in the flattened batch; the key is left out when no item has an image.
    """

    pad_token_id: int  # the tokenizer's pad_token_id: <|endoftext|>, since Qwen has no pad token
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
