"""Does the trained demo model use the image, and in which wordings? `python -m demo.evaluate --config config.yaml`

Asks every held-out question (colour, shape, corner; English and Chinese) about every held-out image with the
project's evaluator (`evaluation.runner.evaluate_samples`), each kind in three wordings (demo/wordings.py): the
one the image training asks ("trained"), one only the tiny QWen's text pretraining asks ("text_only": the
transfer from text to images) and one no training text contains ("never_seen"). Every question is asked with
its image and with the image blanked ("blind"); the trained wordings also with the image of another held-out
picture (a seeded derangement among the askers of the same question), scored two ways: against that picture's
answer ("shuffled": a model that reads the image scores as with its own) and against the question's own image's
answer ("shuffled_own": a model that reads the image drops to about chance, one that ignores it does not).
Writes `<output_dir>/demo_eval.json`:

    accuracy_with_image, accuracy_blind, accuracy_shuffled, accuracy_shuffled_own, chance_level, n,
    by_attribute, by_language        the trained wordings (the image training's own questions)
    wordings: {trained, text_only, never_seen}: {with_image, blind, n, by_attribute, by_language, by_kind}
    blank, shuffled, shuffled_own, checkpoint, examples

The blank image is mean grey: every pixel CLIP's mean colour, i.e. all zeros after normalisation, so the model
sees an image with no content and can only fall back on its priors. The chance level is what uniform guessing
among each question's labels scores (1/6 colour, 1/3 shape, 1/4 corner). An answer counts when it names exactly
the expected label (`demo.synthetic.normalise_answer`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.fileio import write_json
from settings import ConfigError
from settings.training import parse_train_args

WORDING_SETS = ("trained", "text_only", "never_seen")
PASS_KEYS = {"with_image": "correct", "blind": "blank_correct", "shuffled": "shuffled_correct",
             "shuffled_own": "shuffled_own_correct"}
ATTRIBUTE_NAMES = ("colour", "shape", "position")
LANGUAGES = ("en", "zh")


def heldout_samples(heldout_file: Path) -> list:
    """One qa sample per (held-out image, question); samples asking the same question may swap images."""
    from dataprocess.schema import IMAGE_MARKER
    from evaluation.samples import EvalSample

    samples = []
    for row in json.loads(heldout_file.read_text(encoding="utf-8")):
        image = str(heldout_file.parent / row["image"])
        for q in row["questions"]:
            samples.append(EvalSample(
                id=f"{row['image']}:{q['lang']}:{q['attribute']}:{q['wording']}", language=q["lang"], kind="qa",
                prompt=f"{IMAGE_MARKER}\n{q['question']}", images=[image], references=[q["answer"]], answer=q["answer"],
                group=q["question"], info={"attribute": q["attribute"], "wording": q["wording"]},
            ))
    return samples


def chance_level(attribute: str) -> float:
    from demo.synthetic import ATTRIBUTES

    return 1 / len(ATTRIBUTES[attribute])


def own_image_scores(samples: list, rows: list[dict], normalise) -> list[bool]:
    """Each shuffled-image answer (`row["shuffled_prediction"]`) scored against the answer of the question's OWN
    image (`sample.answer`), not the answer of the image shown: what a model that ignores the image keeps."""
    scores = []
    for sample, row in zip(samples, rows):
        expected = normalise(sample.answer, sample.language)
        scores.append(expected is not None and normalise(row["shuffled_prediction"], sample.language) == expected)
    return scores


def accuracies(samples: list, rows: list[dict], keep=lambda s: True) -> dict:
    """{pass: share right} over the samples `keep` selects, for each pass the rows hold (PASS_KEYS)."""
    chosen = [r for s, r in zip(samples, rows) if keep(s)]
    return {name: round(sum(r[key] for r in chosen) / len(chosen), 4) if chosen else None
            for name, key in PASS_KEYS.items() if rows and key in rows[0]}


def wording_report(samples: list, rows: list[dict]) -> dict:
    """The accuracies of one wording set: overall, per attribute, per language and per kind (language, attribute)."""
    return {
        **accuracies(samples, rows), "n": len(samples),
        "by_attribute": {a: accuracies(samples, rows, lambda s, a=a: s.info["attribute"] == a)
                         for a in ATTRIBUTE_NAMES},
        "by_language": {g: accuracies(samples, rows, lambda s, g=g: s.language == g) for g in LANGUAGES},
        "by_kind": {f"{g} {a}": accuracies(samples, rows,
                                           lambda s, g=g, a=a: (s.language, s.info["attribute"]) == (g, a))
                    for g in LANGUAGES for a in ATTRIBUTE_NAMES},
    }


def summarise(samples: list, rows: list[dict]) -> dict:
    """demo_eval.json's figures from the scored rows of every held-out question (see the module docstring)."""
    sets = {w: [(s, r) for s, r in zip(samples, rows) if s.info["wording"] == w] for w in WORDING_SETS}
    reports = {w: wording_report([s for s, _ in pairs], [r for _, r in pairs]) for w, pairs in sets.items() if pairs}
    trained = [s for s, _ in sets["trained"]]
    trained_rows = [r for _, r in sets["trained"]]
    overall = accuracies(trained, trained_rows)
    return {
        "accuracy_with_image": overall["with_image"],
        "accuracy_blind": overall["blind"],
        "accuracy_shuffled": overall.get("shuffled"),
        "accuracy_shuffled_own": overall.get("shuffled_own"),
        "chance_level": round(sum(chance_level(s.info["attribute"]) for s in trained) / len(trained), 4),
        "n": len(trained),
        "by_attribute": {
            a: {**accuracies(trained, trained_rows, lambda s, a=a: s.info["attribute"] == a),
                "chance": round(chance_level(a), 4)}
            for a in ATTRIBUTE_NAMES
        },
        "by_language": {g: accuracies(trained, trained_rows, lambda s, g=g: s.language == g) for g in LANGUAGES},
        "wordings": reports,
    }


def evaluate(checkpoint: Path, heldout_file: Path, batch_size: int = 64, seed: int = 0) -> dict:
    from dataprocess.schema import IMAGE_MARKER
    from demo.synthetic import normalise_answer
    from evaluation.generation import BLANK
    from evaluation.runner import evaluate_samples
    from inference import load_checkpoint

    everything = heldout_samples(heldout_file)
    trained = [s for s in everything if s.info["wording"] == "trained"]
    others = [s for s in everything if s.info["wording"] != "trained"]
    loaded = load_checkpoint(checkpoint, device="cpu")
    options = dict(seed=seed, normalise=normalise_answer, batch_size=batch_size, max_new_tokens=12,
                   repetition_penalty=1.0, progress=False)
    metrics, rows = evaluate_samples(loaded, trained, **options)
    for row, own in zip(rows, own_image_scores(trained, rows, normalise_answer)):
        row["shuffled_own_correct"] = own
    other_rows = evaluate_samples(loaded, others, passes=("with_image", "blank"), **options)[1] if others else []
    result = summarise(trained + others, rows + other_rows)
    return {
        **result,
        "blank": BLANK,
        "shuffled": f"{metrics['shuffled']['swapped']} of {len(trained)} questions asked about another held-out "
                    "image (same question), scored against that image's answer",
        "shuffled_own": "the same answers scored against the answer of the question's own image",
        "checkpoint": str(checkpoint),
        "examples": [{"question": r["prompt"].replace(IMAGE_MARKER, "").strip(), "expected": s.answer,
                      "answer": r["prediction"]} for s, r in zip(trained[:12], rows[:12])],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        setup = parse_train_args(argv)
        train_args, demo = setup.args, setup.config.require("demo")
    except (ConfigError, FileNotFoundError) as e:
        print(f"demo.evaluate: error: {e}", file=sys.stderr)
        return 2
    checkpoint = Path(train_args.output_dir)
    heldout = Path(demo.workdir) / "raw" / "heldout.json"
    for path in (checkpoint / "vlm_config.json", heldout):
        if not path.is_file():
            print(f"demo.evaluate: error: not found: {path} (run `bash train.sh` first)", file=sys.stderr)
            return 2
    started = time.time()
    result = evaluate(checkpoint, heldout)
    out = write_json(checkpoint / "demo_eval.json", result)
    print(f"demo: trained wordings: with the image {result['accuracy_with_image']:.3f}, with a blank image "
          f"{result['accuracy_blind']:.3f}, with shuffled images {result['accuracy_shuffled']:.3f} (against the own "
          f"image's answer {result['accuracy_shuffled_own']:.3f}), chance {result['chance_level']:.3f} "
          f"(n={result['n']}, {time.time() - started:.0f} s) -> {out}")
    for which in WORDING_SETS[1:]:
        report = result["wordings"].get(which)
        if report:
            print(f"demo: {which} wordings: with the image {report['with_image']:.3f}, blind {report['blind']:.3f} "
                  f"(n={report['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
