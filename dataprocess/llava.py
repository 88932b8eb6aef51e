"""LLaVA conversations → unified samples.

The raw file (e.g. `complex_reasoning_77k.json`) is a JSON list of
`{"id": ..., "image": "x.jpg" | ["a.jpg", ...] (optional), "conversations": [{"from": "human" | "gpt", "value": ...}]}`.
Every turn is kept (multi-turn conversations are not cut). `<image>` in a human turn is our image marker too
(dataprocess.schema.IMAGE_MARKER) and stays exactly where the data puts it, newline included; the outer
whitespace of each turn is stripped. Rows without `image` are text-only samples and must then have no `<image>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from dataprocess.schema import (
    ASSISTANT,
    BAD_ROW,
    IMAGE_MARKER,
    MALFORMED_TURNS,
    TAG_MISMATCH,
    USER,
    Drop,
    Kept,
    count_image_tags,
    make_sample,
    turns_problem,
)

ROLES = {"human": USER, "gpt": ASSISTANT}


def _short(value: Any) -> str:
    return repr(value)[:120]


def _images_of(row: dict[str, Any]) -> list[str] | None:
    """The row's image file names ([] when text-only), or None if `image` has the wrong type."""
    image = row.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image] if image.strip() else None
    if isinstance(image, list) and all(isinstance(p, str) and p.strip() for p in image):
        return list(image)
    return None


def convert_row(row: Any, index: int, image_dir: str, source: str) -> Kept | Drop:
    if not isinstance(row, dict):
        return Drop(BAD_ROW, index, None, f"row is {type(row).__name__}, not an object")
    raw_id = row.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
        return Drop(BAD_ROW, index, None, f"'id' missing or not a string: {_short(raw_id)}")
    raw_id = str(raw_id)
    images = _images_of(row)
    if images is None:
        return Drop(
            BAD_ROW,
            index,
            raw_id,
            f"'image' is not a file name or a list of them: {_short(row.get('image'))}",
        )
    conversations = row.get("conversations")
    if not isinstance(conversations, list):
        return Drop(BAD_ROW, index, raw_id, f"'conversations' is not a list: {_short(conversations)}")
    for i, message in enumerate(conversations):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("from"), str)
            and isinstance(message.get("value"), str)
        ):
            return Drop(
                BAD_ROW, index, raw_id, f"message {i} is not {{'from': str, 'value': str}}: {_short(message)}"
            )

    turns = []
    for i, message in enumerate(conversations):
        role = ROLES.get(message["from"])
        if role is None:
            return Drop(MALFORMED_TURNS, index, raw_id, f"message {i} has unknown role {message['from']!r}")
        text = message["value"].strip()
        if role == ASSISTANT and IMAGE_MARKER in text:
            return Drop(TAG_MISMATCH, index, raw_id, f"message {i} (gpt) contains {IMAGE_MARKER}")
        turns.append({"role": role, "content": text})

    problem = turns_problem(turns)
    if problem:
        return Drop(MALFORMED_TURNS, index, raw_id, problem)
    n_tags = count_image_tags(turns)
    if n_tags != len(images):
        return Drop(
            TAG_MISMATCH, index, raw_id, f"{n_tags} {IMAGE_MARKER} tags for {len(images)} images"
        )
    paths = [os.path.abspath(os.path.join(image_dir, p)) for p in images]
    return Kept(index, raw_id, make_sample(source, raw_id, paths, turns))


def convert_llava(rows: Iterable[Any], image_dir: str, source: str) -> Iterator[Kept | Drop]:
    """One `Kept` or `Drop` per raw row, in row order. Image files are not opened here."""
    for index, row in enumerate(rows):
        yield convert_row(row, index, image_dir, source)
