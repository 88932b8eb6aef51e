"""The evaluation's three files, each written whole (`common.fileio.write_files`: aside first, then renamed):

    metrics.json       the scores (what evaluate.py prints), written last
    predictions.jsonl  one row per scored sample: id, prompt, images, prediction, references (+ language, kind,
                       its score, and after a generation run the blank and shuffled answers);
                       `evaluate.py --predictions` reads it back
    report.md          the table, and examples: the best and worst captions by sentence CIDEr-D, wrong answers
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from common.fileio import write_files
from evaluation.scoring import CAPTION_METRICS
from evaluation.text import LANGUAGES

METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE = "metrics.json", "predictions.jsonl", "report.md"
OUTPUT_FILES = (METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE)
HEADERS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_l": "ROUGE-L",
           "cider": "CIDEr-D"}
PASS_TITLES = {"with_image": "with image", "blank": "blank image", "shuffled": "shuffled images"}


def dumps(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def write_outputs(folder: Path, metrics: dict, rows: list[dict]) -> None:
    """Write the three files into `folder` (created if missing). On any error (disk full, no permission) no
    file of `folder` has changed, and the folders this call created are removed again."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()][::-1]  # outermost first
    try:
        write_files({  # all written aside first, then renamed in reverse order: metrics.json lands last
            folder / METRICS_FILE: [dumps(metrics)],
            folder / REPORT_FILE: [render_report(metrics, rows)],
            folder / PREDICTIONS_FILE: (json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        })
    except BaseException:
        for path in reversed(created):  # innermost first; rmdir removes only an empty folder
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if isinstance(value, float) and value < 0 else f"{value:.4f}"


def render_report(metrics: dict, rows: list[dict], n_examples: int = 3) -> str:
    passes = [("with_image", metrics)] + [(p, metrics[p]) for p in ("blank", "shuffled") if p in metrics]
    titles = PASS_TITLES if len(passes) > 1 else {"with_image": "as given"}  # a predictions file: unknown
    lines = ["# Evaluation", ""]
    for key in ("checkpoint", "data", "predictions"):
        if metrics.get("settings", {}).get(key):
            lines.append(f"- {key}: `{metrics['settings'][key]}`")
    for lang in LANGUAGES:
        lines.append(f"- tokenizer ({lang}): {metrics['tokenizer'][lang]}")
    skipped = metrics.get("skipped", {}).get("n")
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in metrics["skipped"]["by_reason"].items())
        ids = ", ".join(f"`{r['id']}`" for r in metrics["skipped"]["first"])
        more = " …" if skipped > len(metrics["skipped"]["first"]) else ""
        lines.append(f"- skipped, not scored: {skipped} samples whose image could not be loaded ({reasons}): "
                     f"{ids}{more}")
    if "shuffled" in metrics:
        lines.append(f"- blank image: {metrics['settings']['blank']}; shuffled: {metrics['shuffled']['swapped']} of "
                     f"{metrics['settings']['samples']} samples asked about another sample's images, scored against "
                     "that sample's references")
    lines += ["", "## Captions and long answers", "",
              "| language | images | n | " + " | ".join(HEADERS[m] for m in CAPTION_METRICS) + " |",
              "|---|---|---|" + "---|" * len(CAPTION_METRICS)]
    for lang in LANGUAGES:
        if not metrics[lang]["n"]:
            continue
        for name, result in passes:
            cells = " | ".join(_fmt(result[lang][m]) for m in CAPTION_METRICS)
            lines.append(f"| {lang} | {titles[name]} | {result[lang]['n']} | {cells} |")
        if "image_gain" in metrics:
            cells = " | ".join(_fmt(metrics["image_gain"][lang][m]) for m in CAPTION_METRICS)
            lines.append(f"| {lang} | **gain** (with − blank) | | {cells} |")
    if metrics["n_qa"]:
        lines += ["", "## Short answers (normalised exact match)", "",
                  "| language | n | " + " | ".join(titles[name] for name, _ in passes) + " |",
                  "|---|---|" + "---|" * len(passes)]
        for lang in (*LANGUAGES, None):
            n = metrics[lang]["n_qa"] if lang else metrics["n_qa"]
            if n:
                accs = " | ".join(_fmt(r[lang]["accuracy"] if lang else r["accuracy"]) for _, r in passes)
                lines.append(f"| {lang or 'all'} | {n} | {accs} |")
    lines += _examples(rows, n_examples)
    return "\n".join(lines) + "\n"


def _example(row: dict, score: str) -> list[str]:
    refs = "; ".join(row["references"][:3]) + (" …" if len(row["references"]) > 3 else "")
    prompt = " `{}`".format(" ".join(row["prompt"].split())) if row.get("prompt") else ""  # one line
    return [f"- **{row['id']}** ({score}){prompt}", f"  - prediction: {row['prediction']}", f"  - references: {refs}"]


def _examples(rows: list[dict], n: int) -> list[str]:
    out = []
    for lang in LANGUAGES:
        scored = sorted((r for r in rows if r["language"] == lang and "cider" in r), key=lambda r: -r["cider"])
        if not scored:
            continue
        best, worst = scored[:n], scored[-n:][::-1] if len(scored) > n else []
        out += ["", f"## Examples ({lang}): best and worst by sentence CIDEr-D", ""]
        for title, group in (("best", best), ("worst", worst)):
            for r in group:
                out += _example(r, f"{title}, CIDEr-D {r['cider']:.3f}")
    wrong = [r for r in rows if r.get("correct") is False][:n]
    if wrong:
        out += ["", "## Wrong short answers (first few)", ""]
        for r in wrong:
            out += _example(r, f"expected: {r.get('answer') or r['references'][0]}")
    return out
