"""From samples (or predictions) to metrics and per-sample rows: what evaluate.py, the training callback and
the demo call.

`evaluate_samples` generates the answers of the passes it is given (default: with the image, with a blank
image, with shuffled images), scores each pass like a predictions file, and returns
(metrics, rows). metrics: the with-image scores at the top level ({"en": {...}, "zh": {...}, "accuracy",
"n_qa", "tokenizer"}, the same shape `score_predictions` gives), then "blank" and "shuffled" in the same
shape, and "image_gain": with image minus blank, per language and metric.
"""

from __future__ import annotations

from evaluation.samples import PASSES, EvalSample, shuffled_partners
from evaluation.scoring import Normaliser, gain, score_rows
from evaluation.text import normalise_answer

SHUFFLE = "each sample asked about the images of another sample of its group, scored against that sample's references"


def _row(sample: EvalSample, prediction: str, source: EvalSample | None = None) -> dict:
    """A predictions-file row; `source`: the sample whose images were shown (its references score the answer).
    The prompt is written as a user types it: `<image>` where an image goes."""
    source = source or sample
    row = {"id": sample.id, "language": source.language, "kind": source.kind,
           "prompt": sample.prompt, "images": source.images, "prediction": prediction,
           "references": source.references}
    if source.answer is not None:
        row["answer"] = source.answer
    return row


def _with_scores(rows: list[dict], details: list[dict]) -> list[dict]:
    return [{**r, **d} for r, d in zip(rows, details)]


def score_predictions(rows: list[dict], *, ptb: bool = False, normalise: Normaliser = normalise_answer):
    """(metrics, rows with their sentence CIDEr-D or correctness) of a predictions file's rows."""
    summary, details = score_rows(rows, ptb=ptb, normalise=normalise)
    return summary, _with_scores(rows, details)


def evaluate_samples(
    loaded,
    samples: list[EvalSample],
    *,
    passes: tuple[str, ...] = PASSES,
    seed: int = 0,
    ptb: bool = False,
    normalise: Normaliser = normalise_answer,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    repetition_penalty: float | None = None,
    progress: bool = True,
    memo: bool = True,
) -> tuple[dict, list[dict]]:
    """(metrics, rows): the answers of `passes` for `samples` with the checkpoint `loaded`
    (`inference.LoadedCheckpoint`), scored; see the module docstring."""
    from evaluation.generation import BLANK, generate_passes

    if not samples:
        raise ValueError("no samples to evaluate")
    partners = shuffled_partners(samples, seed) if "shuffled" in passes else None
    answers = generate_passes(loaded, samples, partners, passes=passes, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                              progress=progress, memo=memo)
    scored = {}
    for name in passes:
        rows = [_row(s, answers[name][i], samples[partners[i]] if name == "shuffled" else None)
                for i, s in enumerate(samples)]
        scored[name] = score_predictions(rows, ptb=ptb, normalise=normalise)

    metrics = dict(scored["with_image"][0]) if "with_image" in passes else {}
    rows = scored["with_image"][1] if "with_image" in passes else [_row(s, "") for s in samples]
    for name in ("blank", "shuffled"):
        if name not in passes:
            continue
        summary, pass_rows = scored[name]
        metrics[name] = {k: v for k, v in summary.items() if k != "tokenizer"}
        for row, pass_row, i in zip(rows, pass_rows, range(len(samples))):
            row[f"{name}_prediction"] = pass_row["prediction"]
            for key in ("cider", "correct"):
                if key in pass_row:
                    row[f"{name}_{key}"] = pass_row[key]
            if name == "shuffled":
                row["shuffled_images_of"] = samples[partners[i]].id
    if "shuffled" in passes:
        metrics["shuffled"]["swapped"] = sum(p != i for i, p in enumerate(partners))
    if "with_image" in passes and "blank" in passes:
        metrics["image_gain"] = gain(metrics, metrics["blank"])
    metrics["settings"] = {"samples": len(samples), "seed": seed, "max_new_tokens": max_new_tokens,
                           "blank": BLANK, "shuffle": SHUFFLE}
    return metrics, rows
