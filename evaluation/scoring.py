"""Scores of a set of predictions: caption metrics per language from pycocoevalcap, short-answer accuracy.

A row is a dict {"id", "language": "en" | "zh", "kind": "caption" | "qa", "prediction", "references": [...],
"answer"?}. Caption rows (captions and long answers) of one language form one corpus: BLEU-1..4 (corpus
level, closest reference length), ROUGE-L (mean over rows) and CIDEr-D (mean over rows; n-gram document
frequencies from that corpus's references, so the same row can score differently in another corpus) come
from pycocoevalcap's own `Bleu(4)` and `Cider` scorers and its `Rouge` with a bounded-memory LCS
(`evaluation.rouge.RougeL`: equal scores) on the tokens of `evaluation.text`, joined by single spaces.
(pycocoevalcap's `Cider` is CIDEr-D: clipped counts, a Gaussian length penalty with sigma 6, x10.) Memory
grows with the texts' length, never with a prediction's length times a reference's; nothing is cut. A row's
sentence CIDEr-D is its term of that mean. Qa rows count as correct when the normalised prediction equals the
normalised `answer` (or, without one, any normalised reference).
"""

from __future__ import annotations

from collections.abc import Callable

from evaluation.text import LANGUAGES, normalise_answer, tokenize, tokenizer_description

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")
Normaliser = Callable[[str, str], object]  # (text, language) -> a comparable value


def caption_scores(predictions: list[str], references: list[list[str]], language: str, *, ptb: bool = False):
    """Corpus metrics {bleu_1..4, rouge_l, cider} and the per-row CIDEr-D of one language's caption rows."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from evaluation.rouge import RougeL

    if not predictions:
        return dict.fromkeys(CAPTION_METRICS), []
    flat = list(predictions) + [r for refs in references for r in refs]
    tokens = [" ".join(t) for t in tokenize(flat, language, ptb=ptb)]
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts, k = {}, len(predictions)
    for i, refs in enumerate(references):
        gts[i] = tokens[k:k + len(refs)]
        k += len(refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = RougeL().compute_score(gts, res)
    if any(ref.split() for refs in gts.values() for ref in refs):
        cider, per_row = Cider().compute_score(gts, res)
    else:  # no reference has a word: pycocoevalcap's document frequencies would be empty (max() of nothing)
        cider, per_row = 0.0, [0.0] * len(predictions)
    metrics = dict(zip(CAPTION_METRICS, [*map(float, bleu), float(rouge), float(cider)]))
    return metrics, [float(s) for s in per_row]


def is_correct(row: dict, normalise: Normaliser = normalise_answer) -> bool:
    """The normalised prediction equals the normalised answer (or a reference). A prediction that normalises to
    nothing ("" or None: no word, or no label the normaliser knows) is never correct, whatever it is compared to."""
    accepted = [row["answer"]] if row.get("answer") is not None else row["references"]
    predicted = normalise(row["prediction"], row["language"])
    if predicted is None or predicted == "":
        return False
    return any(predicted == normalise(a, row["language"]) for a in accepted)


def score_rows(rows: list[dict], *, ptb: bool = False, normalise: Normaliser = normalise_answer):
    """(summary, per-row details) of a set of rows.

    summary: {"en": {bleu_1..4, rouge_l, cider, n, accuracy, n_qa}, "zh": {...}, "accuracy", "n_qa",
    "tokenizer": {"en", "zh"}}; metrics of a language with no rows of that kind are None.
    details[i]: {"cider": sentence CIDEr-D} for a caption row, {"correct": bool} for a qa row.
    """
    details: list[dict] = [{} for _ in rows]
    summary: dict = {}
    correct_all = []
    for language in LANGUAGES:
        captions = [i for i, r in enumerate(rows)
                    if r["language"] == language and r.get("kind", "caption") == "caption"]
        metrics, per_row = caption_scores(
            [rows[i]["prediction"] for i in captions], [rows[i]["references"] for i in captions], language, ptb=ptb
        )
        for i, s in zip(captions, per_row):
            details[i]["cider"] = s
        qa = [i for i, r in enumerate(rows) if r["language"] == language and r.get("kind", "caption") == "qa"]
        correct = [is_correct(rows[i], normalise) for i in qa]
        for i, ok in zip(qa, correct):
            details[i]["correct"] = ok
        correct_all += correct
        summary[language] = {**metrics, "n": len(captions), "accuracy": mean(correct), "n_qa": len(qa)}
    summary["accuracy"] = mean(correct_all)
    summary["n_qa"] = len(correct_all)
    summary["tokenizer"] = {lang: tokenizer_description(lang, ptb=ptb) for lang in LANGUAGES}
    return summary, details


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def gain(with_image: dict, blank: dict) -> dict:
    """Per language and metric, with image minus blank (None where either is None)."""

    def diff(a, b):
        return None if a is None or b is None else a - b

    out = {lang: {m: diff(with_image[lang][m], blank[lang][m]) for m in (*CAPTION_METRICS, "accuracy")}
           for lang in LANGUAGES}
    out["accuracy"] = diff(with_image["accuracy"], blank["accuracy"])
    return out
