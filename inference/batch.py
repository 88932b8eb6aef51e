"""Answering a file of prompts (`infer.py --batch prompts.jsonl --output answers.jsonl`), resumably.

Input: JSON Lines, one `{"id": ..., "images": [...], "prompt": "..."}` per line (blank lines skipped). `id` is a
string or an integer (default: the line number); `images` a list of paths or one path as a string (default:
none), relative paths taken from the batch file's folder; `<image>` marks in the prompt as in infer.py.

1. Every row is checked before the model is loaded: a line that is not UTF-8 or not JSON (an integer of more
   than 4300 digits and nesting too deep included), a row that is not an object, has no string prompt, has
   another key (a misspelt `image` would otherwise be answered without its image), an image entry that is not
   a path, an image that is missing or does not decode, a prompt with a lone surrogate (JSON's `"\\ud800"`,
   which is not text) or whose `<image>` count differs from its images gets an error line in its place; the
   others are answered. Two rows with the same id make the whole file an error (naming the ids).
2. A row's identity is its id and its `row_hash`: the first 16 hex digits of the SHA-256 of the id and what
   the row asks, its JSON object as written less the id (key order, spacing and `"a.jpg"` for `["a.jpg"]` do
   not count; for a line that is not an object with a usable id, its bytes). Images count by their paths as
   written, not by their contents: an image replaced under the same name is not noticed.
3. Output: one line per row, in input order: `{"id", "row_hash", "answer"}` or `{"id", "row_hash", "error"}`,
   UTF-8 (a lone surrogate, as in an id `"\\ud800"`, is written back as that escape), appended and synced
   chunk by chunk, so an interrupted run keeps every line it completed.
4. `open_answers` opens the output before the model loads, and changes nothing in it unless every line is an
   answer to a row of this batch, with that row's id and row_hash: any other file (settings.json, a
   pretty-printed JSON), or the answers of another batch (the same ids for other questions included), is
   refused untouched. Then it is opened for appending (one that cannot be written is refused, unchanged), and
   a last line cut short by a kill (the start of a line for a row that has none) is cut off.
5. A rerun with the same output skips every id it already has a line for (answered or failed) and appends the
   others, so each id ends with exactly one line, and a run interrupted at any byte and rerun leaves the lines
   of an uninterrupted run (with answers as batched generation gives them: the rows after the interruption
   share chunks differently). To retry the rows that failed, delete their lines (their new lines are appended
   last) or write to a new file.
6. A write that fails part way (disk full) cuts the file back to its last complete line and raises
   AnswersWriteError: a rerun resumes from there.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .generation import PromptError, query_with_images


class BatchError(ValueError):
    """A batch file or output file that cannot be used as a whole; the message names the file and the problem."""


class AnswersWriteError(Exception):
    """The output could not be written part way (disk full, say); its complete lines are kept."""


ROW_HASH_DIGITS = 16
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Row:
    line: int  # 1-based line of the batch file
    id: Any  # str or int, as written (the line number when absent or unusable)
    row_hash: str  # what the row asks (see the module docstring, 2.)
    prompt: str | None = None
    images: list[str] = field(default_factory=list)  # resolved paths
    error: str | None = None  # why the row is not answered


def id_key(value: Any) -> str:
    """Ids compare as JSON values: 7 and "7" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def row_hash(row_id: Any, value: Any) -> str:
    """The identity of a row: its id with its JSON `value` in canonical form, or with the bytes of a line that is
    not JSON (`value` bytes). ValueError for a value nested too deeply to write out."""
    if isinstance(value, bytes):
        content = b"raw\n" + value
    else:
        try:
            content = b"json\n" + json.dumps(value, sort_keys=True, separators=(",", ":")).encode("ascii")
        except RecursionError:
            raise ValueError("nested too deeply") from None
    return hashlib.sha256(json.dumps(row_id).encode("ascii") + b"\n" + content).hexdigest()[:ROW_HASH_DIGITS]


def _asked(raw: dict) -> dict:
    """What a row asks, in one form: without its id (hashed with it), `images` always a list."""
    asked = {key: value for key, value in raw.items() if key != "id"}
    images = asked.get("images", [])
    asked["images"] = [images] if isinstance(images, str) else images
    return asked


def _parse_row(line: int, data: bytes, folder: Path) -> Row:
    def refused(why: str) -> Row:  # a line that is not a row: the line number is its id, its bytes its identity
        return Row(line, line, row_hash(line, data), error=f"line {line}: {why}")

    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return refused(f"not UTF-8 text (byte {e.start + 1})")
    except json.JSONDecodeError as e:
        return refused(f"not valid JSON ({e.msg})")
    except (ValueError, RecursionError) as e:  # a number beyond Python's 4300 digits, nesting beyond its stack
        why = "nested too deeply" if isinstance(e, RecursionError) else "a number with too many digits"
        return refused(f"cannot be read as JSON ({why})")
    if not isinstance(raw, dict):
        return refused(f"not a JSON object with a prompt, but a {type(raw).__name__}")
    row_id = raw.get("id", line)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return refused(f"id must be a string or an integer, got {row_id!r}")
    try:
        row = Row(line, row_id, row_hash(row_id, _asked(raw)))
    except ValueError as e:
        return refused(f"cannot be read as JSON ({e})")
    unknown = sorted(set(raw) - {"id", "images", "prompt"})
    prompt, images = raw.get("prompt"), raw.get("images", [])
    if unknown:
        row.error = f"unknown key(s) {unknown} (a row has id, images, prompt)"
    elif not isinstance(prompt, str):
        row.error = "no prompt" if prompt is None else f"prompt must be a string, got {prompt!r}"
    elif surrogate := _LONE_SURROGATE.search(prompt):
        row.error = (f"the prompt has a lone surrogate {ascii(surrogate.group())[1:-1]} (character "
                     f"{surrogate.start() + 1}): not text, it cannot be encoded")
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
    are checked by `check_images`). Lines end in "\\n" (a "\\r" before it is dropped). BatchError for a missing
    or unreadable file or duplicate ids."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"batch file not found: {path}")
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise BatchError(f"batch file {path} cannot be read ({e.strerror or e})") from e
    folder = path.resolve().parent
    rows = [_parse_row(n, text.removesuffix(b"\r"), folder)
            for n, text in enumerate(data.split(b"\n"), start=1) if text.strip()]
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


# ---- the output file -------------------------------------------------------------------------------------------

def _utf8(text: str) -> bytes:
    """`text` (JSON) as UTF-8, each lone surrogate (inside a JSON string: nowhere else) written as its escape."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


def _line_head(row: Row) -> str:
    """How every line written for `row` starts: `{"id": ..., "row_hash": "...", ` (the answer or error follows)."""
    return json.dumps({"id": row.id, "row_hash": row.row_hash}, ensure_ascii=False)[:-1] + ", "


def answer_line(row: Row, key: str, value: str) -> bytes:
    """The output line of `row`: `key` is "answer" or "error"."""
    return _utf8(_line_head(row) + json.dumps({key: value}, ensure_ascii=False)[1:] + "\n")


def _answer_entry(line: bytes) -> dict | None:
    """The line as {"id", "row_hash", "answer" or "error"}; None when it is not such a line."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not (isinstance(entry, dict) and len(entry) == 3 and "id" in entry and isinstance(entry.get("row_hash"), str)
            and (isinstance(entry.get("answer"), str) or isinstance(entry.get("error"), str))):
        return None
    return entry


def _is_old_answer_line(line: bytes) -> bool:
    """A line of the infer.py before row hashes: {"id", "answer"} or {"id", "error"}."""
    with contextlib.suppress(ValueError, RecursionError):
        entry = json.loads(line.decode("utf-8"))
        return isinstance(entry, dict) and len(entry) == 2 and "id" in entry and bool({"answer", "error"} & set(entry))
    return False


def _check_answers(path: Path, data: bytes, rows: list[Row]) -> tuple[dict[str, int], int]:
    """The ids that `data` (the output's bytes) has lines for, with their line numbers, and the length of its
    complete lines (what stays after a line cut short by a kill). BatchError when it is not this batch's answers."""
    refuse = "refusing to change it (name a new --output file)"
    complete = data.rfind(b"\n") + 1
    by_key = {id_key(row.id): row for row in rows}
    done: dict[str, int] = {}
    for n, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        entry = _answer_entry(line)
        if entry is None:
            why = ("an answer line without row_hash, written by an earlier infer.py that did not record which question"
                   " it answered" if _is_old_answer_line(line) else
                   'not an answer line of infer.py ({"id", "row_hash", "answer" or "error"})')
            raise BatchError(f"--output {path}, line {n}: {why}; {refuse}")
        key = id_key(entry["id"])
        row = by_key.get(key)
        if row is None:
            raise BatchError(f"--output {path}, line {n}: id {key} is not in the batch file: it holds another batch's "
                             f"answers; {refuse}")
        if entry["row_hash"] != row.row_hash:
            raise BatchError(f"--output {path}, line {n}: id {key} was answered for another question than line "
                             f"{row.line} of the batch file asks (its prompt or images differ): another batch's "
                             f"answers, or a row edited since (delete its line to answer it again); {refuse}")
        if key in done:
            raise BatchError(f"--output {path}: id {key} has two lines ({done[key]} and {n}); {refuse}")
        done[key] = n
    tail = data[complete:]
    if tail:
        heads = [_utf8(_line_head(row)) for key, row in by_key.items() if key not in done]
        if not any(head.startswith(tail) or tail.startswith(head) for head in heads):
            last = data.count(b"\n") + 1
            raise BatchError(f"--output {path}, line {last} (the last, with no newline): not the start of an answer "
                             f"line to this batch cut short by a kill; {refuse}")
    return done, complete


def _open_append(path: Path) -> BinaryIO:
    """The output opened for appending, unbuffered: each write goes to the file as it is made."""
    return open(path, "ab", buffering=0)


@dataclass
class Answers:
    """An --output opened by `open_answers`: it holds only answers to this batch, `done` (id keys) have a line."""

    path: Path
    done: set[str]
    file: BinaryIO
    size: int  # bytes on disk: complete lines only
    lines: int  # answer lines on disk

    def append(self, lines: list[bytes]) -> None:
        """Write `lines` and sync them to disk. A failure cuts the file back to where it was (AnswersWriteError)."""
        data = memoryview(b"".join(lines))
        try:
            while data:
                written = self.file.write(data)
                if not written:
                    raise OSError(errno.EIO, "the write made no progress")
                data = data[written:]
            os.fsync(self.file.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.truncate(self.size)
            raise AnswersWriteError(f"--output {self.path} cannot be written ({e.strerror or e}): the {self.lines} "
                                    "answer lines before are kept; rerun to resume once it can be written") from e
        self.size += sum(len(line) for line in lines)
        self.lines += len(lines)


@contextlib.contextmanager
def open_answers(path: str | os.PathLike, rows: list[Row]) -> Iterator[Answers]:
    """Open the output of `rows` for appending, after checking that it is theirs (module docstring, 4.): BatchError
    naming the file and the problem, with the file unchanged, when it is not or cannot be read or written. A file
    this call created is removed on exit if nothing was written to it."""
    path = Path(path)
    try:
        existed = os.path.lexists(path)
        if existed and not path.is_file():
            raise BatchError(f"--output {path} is not a regular file")
        data = path.read_bytes() if existed else b""
    except OSError as e:
        raise BatchError(f"--output {path} cannot be read ({e.strerror or e})") from e
    done, complete = _check_answers(path, data, rows)
    try:
        file = _open_append(path)
    except OSError as e:
        raise BatchError(f"--output {path} cannot be written ({e.strerror or e}); nothing was changed") from e
    try:
        if complete < len(data):  # a kill in the middle of a line: that line was never an answer
            try:
                file.truncate(complete)
            except OSError as e:
                raise BatchError(f"--output {path} cannot be written ({e.strerror or e})") from e
        yield Answers(path, set(done), file, complete, len(done))
    finally:
        empty = os.fstat(file.fileno()).st_size == 0
        file.close()
        if empty and not existed:
            path.unlink(missing_ok=True)


def answer_rows(rows: list[Row], answer: Callable[[list[Row]], list[str | Exception]], answers: Answers,
                batch_size: int) -> tuple[int, int]:
    """Append one line per row to `answers`, in input order: the error of a row that failed its checks, or what
    `answer(chunk)` gives for up to `batch_size` good rows at a time (an answer, or the exception of a row that
    failed in generation). Synced after each chunk. Returns (answered, failed)."""
    counts = {"answer": 0, "error": 0}
    written = 0  # rows[:written] have their line

    def write(upto: int, values: dict[int, str | Exception]) -> None:
        nonlocal written
        lines = []
        for i in range(written, upto):
            value = values[i] if i in values else rows[i].error
            key = "answer" if i in values and not isinstance(value, Exception) else "error"
            lines.append(answer_line(rows[i], key, str(value)))
            counts[key] += 1
        answers.append(lines)
        written = upto

    good = [i for i, row in enumerate(rows) if row.error is None]
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        write(chunk[-1] + 1, dict(zip(chunk, answer([rows[i] for i in chunk]))))
    write(len(rows), {})
    return counts["answer"], counts["error"]
