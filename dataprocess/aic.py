"""AI Challenger captions → unified samples.

The raw file (`caption_train_annotations_20170902.json`) is a JSON list of
`{"url": ..., "image_id": "xxx.jpg", "caption": [five Chinese sentences]}`. Each row becomes one
two-turn sample: a fixed Chinese question with the image tag before or after it, and the first
caption as the answer; every valid caption is kept in `candidates` so that the dataset can pick a
different one each epoch. The question and the tag's side come from an RNG seeded by (seed, row
index), so the output does not depend on the order rows are processed in.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator
from typing import Any

from dataprocess.schema import ASSISTANT, BAD_ROW, IMAGE_MARKER, NO_CAPTIONS, USER, Drop, Kept, make_sample

PROMPTS = (
    "请描述这张图片。",
    "这张图片里有什么？",
    "用一句话描述图中的内容。",
    "图中描绘了什么场景？",
    "简要描述一下这张图片。",
    "请用一句话说明这张图片的内容。",
    "这张照片展示了什么？",
)

# Whitespace between two CJK characters (or full-width punctuation) is noise in Chinese text.
_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_SPACE_IN_CJK = re.compile(rf"(?<=[{_CJK}]) (?=[{_CJK}])")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Strip, fold runs of whitespace (newlines included) to one space, drop spaces inside Chinese text."""
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_IN_CJK.sub("", text)


def prompt_for_row(seed: int, row: int) -> str:
    """The user turn of row `row`: a seeded choice of question, tag before or after it."""
    rng = random.Random(f"aic:{seed}:{row}")  # str seeds are hashed with SHA-512: stable across runs
    question = rng.choice(PROMPTS)
    return f"{IMAGE_MARKER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_MARKER}"


def convert_row(row: Any, index: int, image_dir: str, source: str, seed: int) -> Kept | Drop:
    if not isinstance(row, dict):
        return Drop(BAD_ROW, index, None, f"row is {type(row).__name__}, not an object")
    image_id = row.get("image_id")
    if not isinstance(image_id, str) or not image_id.strip():
        return Drop(BAD_ROW, index, None, f"'image_id' missing or not a non-empty string: {image_id!r}"[:200])
    captions = row.get("caption")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return Drop(BAD_ROW, index, image_id, f"'caption' is not a list of strings: {captions!r}"[:200])
    cleaned = list(dict.fromkeys(c for c in map(clean_caption, captions) if c))  # dedupe, keep order
    if not cleaned:
        return Drop(NO_CAPTIONS, index, image_id, f"{len(captions)} captions, all blank")
    turns = [
        {"role": USER, "content": prompt_for_row(seed, index)},
        {"role": ASSISTANT, "content": cleaned[0], "candidates": cleaned},
    ]
    image = os.path.abspath(os.path.join(image_dir, image_id))
    return Kept(index, image_id, make_sample(source, image_id, [image], turns))


def convert_aic(rows: Iterable[Any], image_dir: str, source: str, seed: int) -> Iterator[Kept | Drop]:
    """One `Kept` or `Drop` per raw row, in row order. Image files are not opened here."""
    for index, row in enumerate(rows):
        yield convert_row(row, index, image_dir, source, seed)
