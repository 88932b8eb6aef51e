"""Answers for evaluation: the shared generation path (`inference`: batched, greedy, left padding), three ways
per sample.

- "with_image": the question with its own images;
- "blank": the same prompt with every image replaced by a blank one, the tower's mean colour (its mean
  pixel: all zeros after normalisation), so the model sees an image with no content. Its answer depends on
  the prompt alone: each distinct prompt (text and number of images) is generated once and its answer given
  to every sample that asks it;
- "shuffled": the question with the images of its partner (`evaluation.samples.shuffled_partners`).

The vision tower runs once per distinct image: during the passes it is wrapped in a small memo keyed by the
pixel values, so an image asked several questions, its shuffled reuse and the blank image are encoded once.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict

import torch
from torch import nn

from evaluation.samples import PASSES, EvalSample

BLANK = "mean colour (the tower's mean pixel: zeros after normalisation)"


class FeatureMemo(nn.Module):
    """The tower, remembering the features of the last `capacity` distinct images (keyed by their pixels)."""

    def __init__(self, tower: nn.Module, capacity: int = 1024):
        super().__init__()
        self.tower = tower
        self.capacity = capacity
        self.memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.encoded = 0  # images the tower really ran on

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    @property
    def num_patches(self) -> int:
        return self.tower.num_patches

    @property
    def hidden_size(self) -> int:
        return self.tower.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        host = pixel_values.detach().to("cpu", torch.float32).contiguous()  # bf16 -> fp32 is exact; numpy has no bf16
        keys = [hashlib.sha1(str(tuple(p.shape)).encode() + p.numpy().tobytes()).digest() for p in host]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if todo:
            first = {k: keys.index(k) for k in todo}
            features = self.tower(pixel_values[[first[k] for k in todo]])  # [n_new, N, C]
            self.encoded += len(todo)
            for k, f in zip(todo, features):
                self.memo[k] = f.clone()  # its own storage: the memo holds exactly `capacity` images
        out = torch.stack([self.memo[k] for k in keys])
        for k in keys:
            self.memo.move_to_end(k)
        while len(self.memo) > self.capacity:
            self.memo.popitem(last=False)
        return out


@contextlib.contextmanager
def memoised_tower(model: nn.Module, capacity: int = 1024):
    """Within the block, `model.vision_tower` encodes each distinct image once."""
    tower = model.vision_tower
    memo = FeatureMemo(tower, capacity)
    model.vision_tower = memo
    try:
        yield memo
    finally:
        model.vision_tower = tower


def generate_passes(
    loaded,
    samples: list[EvalSample],
    partners: list[int] | None = None,
    *,
    passes: tuple[str, ...] = PASSES,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    repetition_penalty: float | None = None,
    progress: bool = True,
    memo: bool = True,
) -> dict[str, list[str]]:
    """{pass: [answer of each sample]} from `loaded` (an `inference.LoadedCheckpoint`) with the shared greedy
    generation (the checkpoint's generation settings unless given, as infer.py uses them). Samples are batched
    in order of prompt length."""
    from tqdm.auto import tqdm

    from inference import Prompt
    from visual import load_image

    if "shuffled" in passes and partners is None:
        raise ValueError("the shuffled pass needs the partners of the samples")
    answers = {name: [""] * len(samples) for name in passes}
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].images), len(samples[i].prompt)))
    gen = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    model = loaded.model
    bar = tqdm(total=len(samples) * len(passes), unit="answer", desc="evaluating", disable=not progress)
    context = memoised_tower(model) if memo else contextlib.nullcontext()
    with context, bar:
        if "blank" in passes:  # its answer depends on the prompt alone: each distinct prompt is asked once
            asker: dict[tuple[str, int], int] = {}  # (prompt, number of images) -> the first sample asking it
            for i in order:
                asker.setdefault((samples[i].prompt, len(samples[i].images)), i)
            distinct, said = list(asker.items()), {}
            for start in range(0, len(distinct), batch_size):
                chunk = distinct[start:start + batch_size]
                prompts = [Prompt(samples[i].prompt, [load_image(p) for p in samples[i].images]) for _, i in chunk]
                out = loaded.generate(prompts, pixel_override=torch.zeros_like, **gen)
                said.update(zip((key for key, _ in chunk), out))
            answers["blank"] = [said[s.prompt, len(s.images)] for s in samples]
            bar.update(len(samples))
        seen = [name for name in passes if name != "blank"]
        shown = {name: partners if name == "shuffled" else range(len(samples)) for name in seen}  # whose images
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            image = {p: load_image(p) for name in seen for i in chunk for p in samples[shown[name][i]].images}
            for name in seen:
                prompts = [Prompt(samples[i].prompt, [image[p] for p in samples[shown[name][i]].images]) for i in chunk]
                for i, answer in zip(chunk, loaded.generate(prompts, **gen)):
                    answers[name][i] = answer
                bar.update(len(chunk))
    return answers
