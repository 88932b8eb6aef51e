"""What process_image.py kept and dropped, per source and per reason, as JSON and as text.

The JSON report (written beside the output as `<output>.report.json`) holds no timings or dates, so
that the same inputs give a byte-identical report:

    {"seed": 1234,
     "kept": 76012, "dropped": 631, "train": 75812, "val": 200,
     "outputs": {"train": "/abs/train.jsonl", "val": "/abs/train.val.jsonl"},   (null when nothing was kept)
     "dropped_by_reason": {"image missing": 12, ...},
     "images": {"checked": 76300, "bad": 14},
     "sources": [{"name": "complex_reasoning_77k", "format": "llava", "annotations": "...", "image_dir": "...",
                  "rows": 76643, "skipped_by_limit": 0, "kept": 76012, "dropped": 631,
                  "dropped_by_reason": {"tag mismatch": {"count": 3,
                                                         "examples": [{"row": 17, "id": "...", "detail": "..."}]}}}]}

Reasons appear in the fixed order of `schema.DROP_REASONS`; examples are the first three by row index.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dataprocess.schema import DROP_REASONS, Drop

MAX_EXAMPLES = 3


def source_entry(
    *,
    name: str,
    fmt: str,
    annotations: str,
    image_dir: str,
    rows: int,
    skipped: int,
    kept: int,
    drops: list[Drop],
) -> dict[str, Any]:
    by_reason: dict[str, Any] = {}
    for reason in DROP_REASONS:
        these = sorted((d for d in drops if d.reason == reason), key=lambda d: d.row)
        if these:
            examples = [{"row": d.row, "id": d.id, "detail": d.detail} for d in these[:MAX_EXAMPLES]]
            by_reason[reason] = {"count": len(these), "examples": examples}
    return {
        "name": name,
        "format": fmt,
        "annotations": annotations,
        "image_dir": image_dir,
        "rows": rows,
        "skipped_by_limit": skipped,
        "kept": kept,
        "dropped": len(drops),
        "dropped_by_reason": by_reason,
    }


def build_report(
    *,
    seed: int,
    sources: list[dict[str, Any]],
    n_train: int,
    n_val: int,
    outputs: dict[str, str] | None,
    images_checked: int,
    images_bad: int,
) -> dict[str, Any]:
    totals: Counter[str] = Counter()
    for s in sources:
        for reason, entry in s["dropped_by_reason"].items():
            totals[reason] += entry["count"]
    return {
        "seed": seed,
        "kept": sum(s["kept"] for s in sources),
        "dropped": sum(s["dropped"] for s in sources),
        "train": n_train,
        "val": n_val,
        "outputs": outputs,
        "dropped_by_reason": {r: totals[r] for r in DROP_REASONS if totals[r]},
        "images": {"checked": images_checked, "bad": images_bad},
        "sources": sources,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as the few lines process_image.py prints."""
    lines = []
    for s in report["sources"]:
        limit = f" (+{s['skipped_by_limit']} skipped by limit)" if s["skipped_by_limit"] else ""
        lines.append(
            f"{s['name']} ({s['format']}): {s['rows'] - s['skipped_by_limit']} rows{limit}, "
            f"kept {s['kept']}, dropped {s['dropped']}"
        )
        for reason, entry in s["dropped_by_reason"].items():
            lines.append(f"  {reason}: {entry['count']}")
            for ex in entry["examples"]:
                lines.append(f"    row {ex['row']} id {ex['id']}: {ex['detail']}")
    lines.append(f"images: {report['images']['checked']} checked, {report['images']['bad']} bad")
    lines.append(
        f"total: kept {report['kept']}, dropped {report['dropped']}"
        f" -> train {report['train']}, val {report['val']}"
    )
    return "\n".join(lines)
