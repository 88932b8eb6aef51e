"""The unified sample: what every converter writes and training reads. The one owner of the format: writing
(`make_sample`, `to_json_line`), reading (`read_samples`) and the rules (`validate_sample`, `check_turns`).

One sample is one JSON object (one line of the processed JSONL file), keys in this order:

    {"id": str, "source": str, "images": [absolute paths, in tag order],
     "turns": [{"role": "user" | "assistant", "content": str, ("candidates": [str, ...])?}, ...]}

- Each image is marked in a USER turn by one `IMAGE_MARKER` ("<image>", LLaVA's own mark), in the order of
  `images`. The marker belongs to no LLM: the language backbone's own placeholder token goes in at tokenisation
  (dataset/conversation.py), so data processed once trains any pair of backbones. Assistant turns are plain
  text: an answer containing "<image>" or "<|im_end|>" is just text.
- Turns alternate user/assistant, start with user, end with assistant; no content is blank (a user
  turn holding only an image tag is not blank).
- `candidates` (captions): every valid answer for that turn; `content` is the first of them.

Also here: the records of raw rows a converter could not use (`Drop`, with a stable reason label).

Files written by earlier versions marked images with Qwen v1's token "<|extra_0|>"; `read_samples` reads them as
they were meant (see `upgrade_first_format`), so they need no reprocessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# what processed files of the first format held instead of IMAGE_MARKER: Qwen v1's image token
from qwen.tokenization_qwen import IMAGE_TAG as FIRST_IMAGE_TAG

SAMPLE_KEYS = ("id", "source", "images", "turns")
IMAGE_MARKER = "<image>"  # one image in a user turn: on disk, in typed prompts (infer.py, the web UI), in exports
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


def turns_problem(turns: Any) -> str | None:
    """Why `turns` break the turn rules (a short detail for reports and errors), or None if they are fine:
    a non-empty list of {"role", "content"} alternating user/assistant, user first, assistant last, no blank
    content."""
    if not isinstance(turns, list) or not turns:
        return "no turns" if turns == [] else "turns must be a list"
    for i, turn in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return f"turn {i} is not a {{role, content}} object with string content"
        if turn.get("role") != expected:
            return f"turn {i} is {turn.get('role')!r}, expected {expected!r}"
        if not turn["content"].strip():
            return f"turn {i} ({turn['role']}) is blank"
    if turns[-1]["role"] != ASSISTANT:
        return f"ends with a {turns[-1]['role']!r} turn, expected 'assistant'"
    return None


def check_turns(turns: Any, where: str) -> None:
    """Raise ValueError (prefixed with `where`) unless `turns` follow the turn rules."""
    problem = turns_problem(turns)
    if problem:
        raise ValueError(f"{where}: {problem}")


def count_image_tags(turns: Sequence[dict[str, Any]]) -> int:
    """Images a conversation refers to: the tags of its user turns (tags in answers are text)."""
    return sum(t["content"].count(IMAGE_MARKER) for t in turns if t["role"] == USER)


def upgrade_first_format(sample: Any) -> Any:
    """A sample of a file processed by an earlier version, as the current format says it; any other value
    unchanged. Those files marked each image with "<|extra_0|>"; a sample whose user turns hold no "<image>" but
    exactly as many "<|extra_0|>" as it has images (at least one) can only be such a sample (in the current
    format it would be invalid), so its tags become markers. Tags in a text-only sample stay text."""
    if not isinstance(sample, dict) or not isinstance(sample.get("images"), list) or not sample["images"]:
        return sample
    turns = sample.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                              for t in turns):
        return sample
    users = [t for t in turns if t.get("role") == USER]
    if any(IMAGE_MARKER in t["content"] for t in users):
        return sample
    if sum(t["content"].count(FIRST_IMAGE_TAG) for t in users) != len(sample["images"]):
        return sample
    upgraded = [{**t, "content": t["content"].replace(FIRST_IMAGE_TAG, IMAGE_MARKER)} if t.get("role") == USER
                else t for t in turns]
    return {**sample, "turns": upgraded}


def validate_sample(sample: Any, where: str | None = None) -> None:
    """Raise ValueError, prefixed with `where` (default: the sample's id), unless `sample` follows the format."""
    if not isinstance(sample, dict) or set(sample) != set(SAMPLE_KEYS):
        keys = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(f"{where or 'sample'}: a sample has exactly the keys {', '.join(SAMPLE_KEYS)}; got {keys}")
    where = where or str(sample["id"])
    if not isinstance(sample["id"], str) or not isinstance(sample["source"], str):
        raise ValueError(f"{where}: id and source must be strings")
    images = sample["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) and os.path.isabs(p) for p in images):
        raise ValueError(f"{where}: images must be a list of absolute paths")
    turns = sample["turns"]
    check_turns(turns, where)
    for i, turn in enumerate(turns):
        if set(turn) not in ({"role", "content"}, {"role", "content", "candidates"}):
            raise ValueError(f"{where}: turn {i} has keys role, content (and candidates): {sorted(turn)}")
        if "candidates" in turn:
            cands = turn["candidates"]
            if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c.strip() for c in cands):
                raise ValueError(f"{where}: turn {i}: candidates must be a non-empty list of non-blank strings")
            if turn["content"] != cands[0]:
                raise ValueError(f"{where}: turn {i}: content must be the first candidate")
    tags = count_image_tags(turns)
    if tags != len(images):
        raise ValueError(f"{where}: {tags} image tags in its user turns but {len(images)} images")


def to_json_line(sample: dict[str, Any]) -> str:
    return json.dumps(sample, ensure_ascii=False) + "\n"


def read_samples(path: str | os.PathLike) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line number, raw line, sample) for each non-blank line of a processed file, every sample validated (and
    read in the current format: `upgrade_first_format`); FileNotFoundError, or ValueError naming the file and
    line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path} (run process_image.py to write it)")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                sample = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from e
            sample = upgrade_first_format(sample)
            sample_id = sample.get("id") if isinstance(sample, dict) else None
            where = f"{path}, line {lineno}" + (f" ({sample_id})" if isinstance(sample_id, str) else "")
            validate_sample(sample, where)
            yield lineno, line, sample
