"""A length-grouped sampler: batches of similar length, so little of each batch is padding.

Each epoch (deterministic in (seed, epoch)): shuffle all indices; cut them into mega-batches of
`mega_batch_mult` batches; sort each mega-batch by length, longest first; cut it into batches;
shuffle the order of the batches; move the batch with the longest sample to the front, so that a
batch that does not fit in memory fails at step 1 rather than hours in. The sampler yields a flat
stream of indices that the DataLoader cuts into batches of `batch_size`, so `batch_size` must be
the per-device batch size; the only incomplete batch stays last, to keep the cut aligned.

Measured with `padding_efficiency` (real tokens / padded tokens) at batch 16 on 77k samples, see
tests/test_sampler.py: LLaVA-like lengths (prompt 20-60 + 256 image tokens + answer 100-400):
0.80 shuffled, 0.99 grouped; AIC-like (256 image tokens + about 25 prompt + a 10-35 token caption):
0.96 shuffled, 1.00 grouped.

Under DDP, accelerate hands out the batches of this one stream round-robin to the ranks (every rank
builds the same stream from the same seed); with a sampler that has `set_epoch`, it no longer calls
the dataset's own `set_epoch`: pass `dataset=` and the sampler forwards the epoch to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / tokens after padding each batch to its longest item."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for batch in batches:
        batch_lengths = lengths[np.asarray(batch, dtype=np.int64)]
        real += int(batch_lengths.sum())
        padded += int(batch_lengths.max()) * len(batch)
    return real / padded if padded else 1.0


class LengthGroupedSampler(Sampler[int]):
    """Every index once per epoch, in batches of similar length (see the module docstring)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        *,
        mega_batch_mult: int = 50,
        longest_first: bool = True,
        dataset: Any = None,
        group_by_length: bool = True,
    ):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size and mega_batch_mult must be positive, got {batch_size}, {mega_batch_mult}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or not len(self.lengths):
            raise ValueError("lengths must be a non-empty sequence of integers")
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.longest_first = longest_first
        self.dataset = dataset  # optional: gets set_epoch too
        self.group_by_length = group_by_length  # False: a plain seeded shuffle (same epoch handling)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order (the last may be incomplete)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if not self.group_by_length:
            return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        mega = self.batch_size * self.mega_batch_mult
        batches: list[np.ndarray] = []
        for begin in range(0, len(order), mega):
            chunk = order[begin:begin + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # Only the last mega-batch can end with an incomplete batch; it must stay last.
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        batches = [batches[i] for i in rng.permutation(len(batches))] + tail
        if self.longest_first and len(batches) > 1 + len(tail):
            longest = max(range(len(batches) - len(tail)), key=lambda b: self.lengths[batches[b]].max())
            batches[0], batches[longest] = batches[longest], batches[0]
        return [b.tolist() for b in batches]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
