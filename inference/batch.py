"""Answering a file of prompts (`infer.py --batch prompts.jsonl --output answers.jsonl`), resumably.

Input: JSON Lines, one `{"id": ..., "images": [...], "prompt": "..."}` per line (blank lines skipped). `id` is a
string or an integer (default: the line number); `images` a list of paths or one path as a string (default:
none), relative paths taken from the batch file's folder; `<image>` marks in the prompt as in infer.py.

1. Every row is checked before the model is loaded: a row that is not an object, has no string prompt, has
   another key (a misspelt `image` would otherwise be answered without its image), an image entry that is not
   a path, an image that is missing or does not decode, or a prompt whose `<image>`
   count differs from its images gets an `{"id", "error"}` line in its place; the others are answered.
   Two rows with the same id make the whole file an error (naming the ids).
2. Output: one line per row, in input order: `{"id", "answer"}` or `{"id", "error"}`, appended and flushed
   as they are produced, so an interrupted run keeps every line it wrote.
3. A rerun with the same output skips every id it already has a line for (answered or failed) and appends
   the others: each id ends with exactly one line. A line cut short by a kill is dropped first. An output
   with a line that is not one of ours, or with ids the batch file does not have, is refused (another run's
   file). To retry the rows that failed, delete their lines or write to a new file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generation import PromptError, query_with_images


class BatchError(ValueError):
    """A batch file or output file that cannot be used as a whole; the message names the file and the problem."""


@dataclass
class Row:
    line: int  # 1-based line of the batch file
    id: Any  # str or int, as written (the line number when absent or unusable)
    prompt: str | None = None
    images: list[str] = field(default_factory=list)  # resolved paths
    error: str | None = None  # why the row is not answered


def id_key(value: Any) -> str:
    """Ids compare as JSON values: 7 and "7" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def _parse_row(line: int, text: str, folder: Path) -> Row:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(line, line, error=f"line {line}: not valid JSON ({e.msg})")
    if not isinstance(raw, dict):
        return Row(line, line, error=f"line {line}: not a JSON object with a prompt, but a {type(raw).__name__}")
    row_id = raw.get("id", line)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return Row(line, line, error=f"line {line}: id must be a string or an integer, got {row_id!r}")
    row = Row(line, row_id)
    unknown = sorted(set(raw) - {"id", "images", "prompt"})
    prompt, images = raw.get("prompt"), raw.get("images", [])
    if unknown:
        row.error = f"unknown key(s) {unknown} (a row has id, images, prompt)"
    elif not isinstance(prompt, str):
        row.error = "no prompt" if prompt is None else f"prompt must be a string, got {prompt!r}"
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, list):
        row.error = f"images must be a list of paths (or one path), got {images!r}"
    if row.error is None:
        bad = [image for image in images if not isinstance(image, str) or not image]
        if bad:
            row.error = f"images must be paths, got {bad[0]!r}"
        else:
            row.prompt = prompt
            row.images = [str(folder / image) if not os.path.isabs(image) else image for image in images]
    return row


def read_batch(path: str | os.PathLike) -> list[Row]:
    """Every row of the batch file, checked for what the file itself says (see the module docstring; the images
    are checked by `check_images`). BatchError for a missing file or duplicate ids."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"batch file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"batch file {path} cannot be read ({e})") from e
    folder = path.resolve().parent
    rows = [_parse_row(n, text, folder) for n, text in enumerate(lines, start=1) if text.strip()]
    seen: dict[str, int] = {}
    duplicates = []
    for row in rows:
        key = id_key(row.id)
        if key in seen:
            duplicates.append(f"{key} (lines {seen[key]} and {row.line})")
        seen.setdefault(key, row.line)
    if duplicates:
        raise BatchError(f"{path}: duplicate id(s): {', '.join(duplicates[:10])}"
                         + (f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""))
    for row in rows:
        if row.error is None:
            try:
                query_with_images(row.prompt, len(row.images))
            except PromptError as e:
                row.error = str(e)
    return rows


def check_images(rows: list[Row], check_image: Callable[[str], None]) -> None:
    """Give each row whose image `check_image(path)` refuses (missing, does not decode) that error; each distinct
    path is checked once."""
    problems: dict[str, str | None] = {}
    for row in rows:
        if row.error is not None:
            continue
        for image in row.images:
            if image not in problems:
                try:
                    check_image(image)
                    problems[image] = None
                except Exception as e:  # ImageLoadError, or a reader bug on one odd file: that row's error
                    problems[image] = str(e)
            if problems[image] is not None:
                row.error = problems[image]
                break


def read_done(output: str | os.PathLike, rows: list[Row]) -> set[str]:
    """Keys of the ids that `output` already has a line for. A trailing line cut short (no newline: a killed
    run) is cut off the file. BatchError for an output that is not a file of answers to this batch."""
    output = Path(output)
    if not output.exists():
        return set()
    with open(output, "rb+") as f:
        data = f.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a kill in the middle of a line: that line was never an answer
            f.truncate(complete)
    ids = {id_key(row.id) for row in rows}
    done: set[str] = set()
    unknown = []
    for n, line in enumerate(data[:complete].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not (isinstance(entry, dict) and "id" in entry and len(entry) == 2 and ({"answer", "error"} & set(entry))):
            raise BatchError(f"--output {output}, line {n}: not an answer line of infer.py; refusing to append to "
                             "another file (name a new or earlier --output file)")
        key = id_key(entry["id"])
        if key not in ids:
            unknown.append(key)
        done.add(key)
    if unknown:
        raise BatchError(f"--output {output} has lines for ids the batch file does not have ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}): it belongs to another batch; name a new file")
    return done


def answer_rows(rows: list[Row], answer: Callable[[list[Row]], list[str | Exception]], output: str | os.PathLike,
                batch_size: int) -> tuple[int, int]:
    """Append one line per row to `output`, in input order: the error of a row that failed its checks, or what
    `answer(chunk)` gives for up to `batch_size` good rows at a time (an answer, or the exception of a row that
    failed in generation). Flushed and synced after each chunk. Returns (answered, failed)."""
    counts = {"answer": 0, "error": 0}
    with open(output, "a", encoding="utf-8", newline="\n") as f:
        written = 0  # rows[:written] have their line

        def write(upto: int, values: dict[int, str | Exception]) -> None:
            nonlocal written
            for i in range(written, upto):
                value = values[i] if i in values else rows[i].error
                key = "answer" if i in values and not isinstance(value, Exception) else "error"
                f.write(json.dumps({"id": rows[i].id, key: str(value)}, ensure_ascii=False) + "\n")
                counts[key] += 1
            f.flush()
            os.fsync(f.fileno())
            written = upto

        good = [i for i, row in enumerate(rows) if row.error is None]
        for start in range(0, len(good), batch_size):
            chunk = good[start:start + batch_size]
            write(chunk[-1] + 1, dict(zip(chunk, answer([rows[i] for i in chunk]))))
        write(len(rows), {})
    return counts["answer"], counts["error"]
