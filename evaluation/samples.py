"""What is evaluated: samples read from a processed JSONL or from a predictions file, and the shuffled pairing.

From a processed JSONL (process_image.py's `{"id", "source", "images", "turns"}`), each sample is asked its
FIRST question (the first user turn, with the images whose markers it holds):
- a caption sample (its answer turn has `candidates`: AI Challenger) is scored against all its captions;
- otherwise the reference is the first answer: a short answer (at most `SHORT_ANSWER_MAX_TOKENS` tokens, like
  the demo's "red" / "左上") is a "qa" sample, scored by normalised exact match; a longer one (LLaVA's
  answers) is scored like a caption, with BLEU, ROUGE-L and CIDEr-D.
The language is "zh" when a reference holds a CJK ideograph, else "en".

Shuffled control: each sample is asked its question with the images of another sample and scored against
that sample's references. Partners come from a seeded derangement (Sattolo's algorithm: one random cycle,
so nobody keeps their own images) inside groups of comparable samples: same source, kind, language and
number of images, and for short answers the same question (the partner's reference must answer the
question asked). A group of one keeps its own images and is counted as not swapped.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dataprocess.schema import IMAGE_MARKER, upgrade_first_format
from evaluation.text import LANGUAGES, detect_language, tokenize

SHORT_ANSWER_MAX_TOKENS = 3
PASSES = ("with_image", "blank", "shuffled")  # how each sample is asked (evaluation.generation)
KINDS = ("caption", "qa")


class InputError(ValueError):
    """A bad input file or row; the message names the file and line."""


@dataclass
class EvalSample:
    id: str
    language: str  # "en" | "zh"
    kind: str  # "caption" (captions, long answers) | "qa" (short answers)
    prompt: str  # the user text, one `<image>` marker per image
    images: list[str]  # image paths, in marker order
    references: list[str]
    answer: str | None = None  # qa: the expected answer (the first reference)
    group: str = ""  # samples of one group may swap images in the shuffled control
    info: dict = field(default_factory=dict)  # free per-sample data (the demo's attribute)


def is_short_answer(text: str, language: str) -> bool:
    return len(tokenize([text], language)[0]) <= SHORT_ANSWER_MAX_TOKENS


def _fail(where: str, message: str):
    raise InputError(f"{where}: {message}")


def read_processed(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """Samples of a processed JSONL (the first `limit` of them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return [sample_from_processed(row, where) for where, row in itertools.islice(_json_lines(path), limit)]


def _json_lines(path: Path):
    """(where, value) of each non-blank line of a JSON Lines file, read as bytes and checked one line at a time:
    UTF-8, valid JSON, not nested beyond what Python can read, numbers Python can convert, and Unicode text that
    can be written again (no lone surrogate such as the escape \\ud800). A bad line raises InputError naming it."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                where = f"{path} line {lineno}"
                yield where, _parse_json_line(raw, where)


def _parse_json_line(raw: bytes, where: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(where, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        _fail(where, f"not valid JSON ({e.msg})")
    except RecursionError:
        _fail(where, "nested too deeply to read")
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        _fail(where, f"not readable JSON ({str(e).split(':')[0]})")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(where, f"holds the lone surrogate \\u{ord(e.object[e.start]):04x}, which is not Unicode text")
    except RecursionError:
        _fail(where, "nested too deeply to read")
    return value


def sample_from_processed(row, where: str) -> EvalSample:
    row = upgrade_first_format(row)  # a file processed by an earlier version reads as meant
    if not isinstance(row, dict) or not {"id", "images", "turns"} <= set(row):
        _fail(where, "not a processed sample (an object with id, source, images, turns)")
    turns, images = row["turns"], row["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        _fail(where, "images must be a list of paths")
    if (not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2])
            or turns[0].get("role") != "user" or turns[1].get("role") != "assistant"
            or not isinstance(turns[0].get("content"), str) or not isinstance(turns[1].get("content"), str)):
        _fail(where, "turns must start with a user turn and an assistant turn, each with a string content")
    question, answer_turn = turns[0]["content"], turns[1]
    n_images = question.count(IMAGE_MARKER)
    if n_images > len(images):
        _fail(where, f"the first question has {n_images} image markers but the sample has {len(images)} images")
    if "candidates" in answer_turn:
        references, kind = list(answer_turn["candidates"]), "caption"
    else:
        references, kind = [answer_turn["content"]], None
    if not references or not all(isinstance(r, str) and r.strip() for r in references):
        _fail(where, "the first answer has no reference text")
    language = detect_language(references)
    if kind is None:
        kind = "qa" if is_short_answer(references[0], language) else "caption"
    source = str(row.get("source", ""))
    group = json.dumps([source, kind, language, n_images, question if kind == "qa" else ""], ensure_ascii=False)
    return EvalSample(
        id=str(row["id"]), language=language, kind=kind, prompt=question, images=images[:n_images],
        references=references, answer=references[0] if kind == "qa" else None, group=group,
    )


def usable_samples(samples: list[EvalSample]) -> tuple[list[EvalSample], list[dict]]:
    """(the samples whose images all load, {"id", "image", "reason"} of each other sample), both in order.

    Each distinct image is decoded once with `visual.load_image` (a JPEG at reduced scale: every byte is still
    read and decoded, so a truncated or corrupt file fails here as it would at generation). A sample with an
    image that is missing, not an image, corrupt or too large is skipped, not scored, and named in the second
    list with the first such image and `visual.ImageLoadError`'s reason."""
    from visual import ImageLoadError, load_image

    problem: dict[str, str | None] = {}  # image path -> why it cannot be used (None: it loads)
    for path in dict.fromkeys(p for s in samples for p in s.images):
        try:
            load_image(path, draft_size=(1, 1))
            problem[path] = None
        except ImageLoadError as e:
            problem[path] = e.reason
    usable, skipped = [], []
    for s in samples:
        bad = next((p for p in s.images if problem[p] is not None), None)
        if bad is None:
            usable.append(s)
        else:
            skipped.append({"id": s.id, "image": bad, "reason": problem[bad]})
    return usable, skipped


def skipped_summary(skipped: list[dict], examples: int = 10) -> dict:
    """metrics.json's "skipped": {"n", "by_reason": {reason: count}, "first": the first `examples` records}."""
    by_reason: dict[str, int] = {}
    for record in skipped:
        by_reason[record["reason"]] = by_reason.get(record["reason"], 0) + 1
    return {"n": len(skipped), "by_reason": by_reason, "first": skipped[:examples]}


def validation_split(config: str | Path = "config.yaml") -> Path:
    """The validation JSONL that process_image.py writes for `config` (its data section)."""
    from settings import load_config

    return Path(load_config(config, sections=("data",)).require("data").resolved_val_output())


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions file, checked: {"id", "language", "prediction", "references", "kind"?, "answer"?}.
    Other keys are kept (a predictions.jsonl written by evaluate.py reads back as is)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    rows = [check_prediction_row(row, where) for where, row in _json_lines(path)]
    if not rows:
        _fail(str(path), "no predictions (the file is empty)")
    return rows


def check_prediction_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        _fail(where, "not a JSON object")
    missing = [k for k in ("id", "language", "prediction", "references") if k not in row]
    if missing:
        _fail(where, f"missing key(s) {', '.join(missing)}")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        _fail(where, f"id must be a string or an integer, got {row['id']!r}")
    if row["language"] not in LANGUAGES:
        _fail(where, f"language must be \"en\" or \"zh\", got {row['language']!r}")
    if not isinstance(row["prediction"], str):
        _fail(where, f"prediction must be a string, got {type(row['prediction']).__name__}")
    refs = row["references"]
    if not isinstance(refs, list) or not refs:
        _fail(where, "references must be a non-empty list of strings")
    for k, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            _fail(where, f"reference {k} is empty or not a string")
    kind = row.setdefault("kind", "caption")
    if kind not in KINDS:
        _fail(where, f"kind must be \"caption\" or \"qa\", got {kind!r}")
    if row.get("answer") is not None and not isinstance(row["answer"], str):
        _fail(where, "answer must be a string")
    return row


# ------------------------------------------------------------------------------------------------ shuffling


def derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation with no fixed point for n >= 2 (Sattolo: a uniformly random single cycle)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: never i itself
        order[i], order[j] = order[j], order[i]
    return order


def shuffled_partners(samples: list[EvalSample], seed: int) -> list[int]:
    """partners[i]: the sample whose images sample i is asked about in the shuffled control."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.group].append(i)
    partners = list(range(len(samples)))
    for key, members in groups.items():
        if len(members) < 2:
            continue
        order = derangement(len(members), random.Random(f"shuffle:{seed}:{key}"))  # str seed: stable across runs
        for a, b in zip(members, order):
            partners[a] = members[b]
    return partners
