"""The unified sample every converter produces, and the records of rows it could not use.

One sample is one JSON object (one line of the processed JSONL file), keys in this order:

    {"id": str, "source": str, "images": [absolute paths, in tag order],
     "turns": [{"role": "user" | "assistant", "content": str, ("candidates": [str, ...])?}, ...]}

- Each image is marked in a USER turn by one `IMAGE_TAG`, in the order of `images`. Assistant turns
  are plain text: an answer containing "<|extra_0|>" or "<|im_end|>" is just text.
- Turns alternate user/assistant, start with user, end with assistant; no content is blank (a user
  turn holding only an image tag is not blank).
- `candidates` (captions): every valid answer for that turn; `content` is the first of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

IMAGE_TAG = "<|extra_0|>"
USER = "user"
ASSISTANT = "assistant"

# Stable labels of why a row was dropped, in the order the report lists them.
BAD_ROW = "bad row"  # not an object, a field missing or of the wrong type
MALFORMED_TURNS = "malformed turns"  # roles not alternating user/assistant, blank content, unknown role
NO_CAPTIONS = "no captions"  # a caption row whose captions are all blank
TAG_MISMATCH = "tag mismatch"  # number of image tags in user turns != number of images
DUPLICATE_ID = "duplicate id"  # a second row with an id already seen in the same source
IMAGE_MISSING = "image missing"
IMAGE_UNREADABLE = "image unreadable"  # not an image, truncated, corrupt or too large
DROP_REASONS = (
    BAD_ROW,
    MALFORMED_TURNS,
    NO_CAPTIONS,
    TAG_MISMATCH,
    DUPLICATE_ID,
    IMAGE_MISSING,
    IMAGE_UNREADABLE,
)


@dataclass(frozen=True)
class Kept:
    """A raw row that became a sample (its image files are checked later)."""

    row: int  # index of the row in the raw file
    raw_id: str  # the row's own id, as the raw file spells it
    sample: dict[str, Any]


@dataclass(frozen=True)
class Drop:
    """A raw row that was not used, and why."""

    reason: str  # one of DROP_REASONS
    row: int
    id: str | None  # the row's raw id, None when the row has none
    detail: str


def make_sample(source: str, raw_id: str, images: list[str], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """A sample with its keys in schema order. Ids are `<source>:<raw id>`, unique across sources."""
    return {"id": f"{source}:{raw_id}", "source": source, "images": list(images), "turns": turns}


def turns_problem(turns: list[dict[str, Any]]) -> str | None:
    """Why `turns` break the turn rules (a short detail for the report), or None if they are fine."""
    if not turns:
        return "no turns"
    for i, turn in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn["role"] != expected:
            return f"turn {i} is {turn['role']!r}, expected {expected!r}"
        if not turn["content"].strip():
            return f"turn {i} ({turn['role']}) is blank"
    if turns[-1]["role"] != ASSISTANT:
        return f"ends with a {turns[-1]['role']!r} turn, expected 'assistant'"
    return None


def count_user_tags(turns: list[dict[str, Any]]) -> int:
    return sum(t["content"].count(IMAGE_TAG) for t in turns if t["role"] == USER)


def validate_sample(sample: Any) -> None:
    """Raise ValueError if `sample` does not follow the schema exactly (for readers and tests)."""
    if not isinstance(sample, dict) or list(sample) != ["id", "source", "images", "turns"]:
        raise ValueError(
            f"a sample must have exactly the keys id, source, images, turns in order: {sample!r}"
        )
    if not isinstance(sample["id"], str) or not isinstance(sample["source"], str):
        raise ValueError(f"id and source must be strings: {sample['id']!r}")
    images = sample["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) and os.path.isabs(p) for p in images):
        raise ValueError(f"{sample['id']}: images must be a list of absolute paths")
    turns = sample["turns"]
    if not isinstance(turns, list):
        raise ValueError(f"{sample['id']}: turns must be a list")
    for turn in turns:
        keys = list(turn) if isinstance(turn, dict) else None
        if keys not in (["role", "content"], ["role", "content", "candidates"]):
            raise ValueError(f"{sample['id']}: a turn has keys role, content (and candidates): {turn!r}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"{sample['id']}: turn content must be a string")
        if "candidates" in turn:
            cands = turn["candidates"]
            if not cands or not all(isinstance(c, str) and c.strip() for c in cands):
                raise ValueError(f"{sample['id']}: candidates must be non-blank strings")
            if turn["content"] != cands[0]:
                raise ValueError(f"{sample['id']}: content must be the first candidate")
    problem = turns_problem(turns)
    if problem:
        raise ValueError(f"{sample['id']}: {problem}")
    if count_user_tags(turns) != len(images):
        raise ValueError(f"{sample['id']}: {count_user_tags(turns)} image tags for {len(images)} images")


def to_json_line(sample: dict[str, Any]) -> str:
    return json.dumps(sample, ensure_ascii=False) + "\n"
