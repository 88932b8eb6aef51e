"""Does the trained demo model use the image? `python -m demo.evaluate --config config.yaml [train flags]`

Asks every held-out question (colour, shape, corner; English and Chinese) about every held-out image with the
project's evaluator (`evaluation.runner.evaluate_samples`) three times: with the image, with the image blanked
and with the image of another held-out picture (a seeded derangement among the askers of the same question,
the answer then scored against that picture's answer), and writes `<output_dir>/demo_eval.json`:
{"accuracy_with_image", "accuracy_blind", "accuracy_shuffled", "chance_level", "n", "by_attribute",
"by_language", "blank", ...}. The blank image is mean grey: every pixel CLIP's mean colour, i.e. all zeros
after normalisation, so the model sees an image with no content and can only fall back on its priors.
The chance level is what uniform guessing among each question's labels scores (1/6 colour, 1/3 shape,
1/4 corner). An answer counts when it names exactly the expected label (`demo.synthetic.normalise_answer`).

Those figures use the questions' training wordings. `unseen_phrasings` asks, with the image, about the first half
of the held-out images, one other wording of each question that no training text contains
(`demo.synthetic.UNSEEN_QUESTIONS`): how far the model understands the question and not only its exact words.
It is reported, not a target; `same_images_seen` is the training wordings' accuracy on the same images.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common.fileio import write_json
from settings import ConfigError
from settings.training import parse_train_args

PASS_KEYS = {"with_image": "correct", "blind": "blank_correct", "shuffled": "shuffled_correct"}


def heldout_samples(heldout_file: Path) -> list:
    """One qa sample per (held-out image, question); samples asking the same question may swap images."""
    from dataprocess.schema import IMAGE_MARKER
    from evaluation.samples import EvalSample

    samples = []
    for row in json.loads(heldout_file.read_text(encoding="utf-8")):
        image = str(heldout_file.parent / row["image"])
        for q in row["questions"]:
            phrasing = q.get("phrasing", "seen")
            samples.append(EvalSample(
                id=f"{row['image']}:{q['lang']}:{q['attribute']}:{phrasing}", language=q["lang"], kind="qa",
                prompt=f"{IMAGE_MARKER}\n{q['question']}", images=[image], references=[q["answer"]], answer=q["answer"],
                group=q["question"], info={"attribute": q["attribute"], "phrasing": phrasing},
            ))
    return samples


def chance_level(attribute: str) -> float:
    from demo.synthetic import ATTRIBUTES

    return 1 / len(ATTRIBUTES[attribute])


def evaluate(checkpoint: Path, heldout_file: Path, batch_size: int = 64, seed: int = 0) -> dict:
    from dataprocess.schema import IMAGE_MARKER
    from demo.synthetic import normalise_answer
    from evaluation.generation import BLANK
    from evaluation.runner import evaluate_samples
    from inference import load_checkpoint

    everything = heldout_samples(heldout_file)
    samples = [s for s in everything if s.info["phrasing"] == "seen"]
    loaded = load_checkpoint(checkpoint, device="cpu")
    options = dict(seed=seed, normalise=normalise_answer, batch_size=batch_size, max_new_tokens=12,
                   repetition_penalty=1.0, progress=False)
    metrics, rows = evaluate_samples(loaded, samples, **options)
    # Other wordings of the questions, never in any training text, asked with the image about the first half of
    # the held-out images (which the seen wordings are asked about too: `same_images_seen` compares like with like).
    images = sorted({s.images[0] for s in samples})
    half = set(images[: max(len(images) // 2, 1)])
    unseen = [s for s in everything if s.info["phrasing"] == "unseen" and s.images[0] in half]
    unseen_rows = evaluate_samples(loaded, unseen, passes=("with_image",), **options)[1] if unseen else []

    def accuracies(keep) -> dict:
        chosen = [r for s, r in zip(samples, rows) if keep(s)]
        return {name: round(sum(r[key] for r in chosen) / len(chosen), 4) if chosen else None
                for name, key in PASS_KEYS.items()}

    overall = accuracies(lambda s: True)

    def unseen_accuracy(keep) -> float | None:
        chosen = [r["correct"] for s, r in zip(unseen, unseen_rows) if keep(s)]
        return round(sum(chosen) / len(chosen), 4) if chosen else None

    same_images = [r["correct"] for s, r in zip(samples, rows) if s.images[0] in half]
    unseen_phrasings = {
        "accuracy_with_image": unseen_accuracy(lambda s: True),
        "same_images_seen": round(sum(same_images) / len(same_images), 4) if same_images else None,
        "n": len(unseen),
        "images": f"{len(half)} of {len(images)} held-out images",
        "by_attribute": {k: unseen_accuracy(lambda s, k=k: s.info["attribute"] == k)
                         for k in ("colour", "shape", "position")},
        "by_language": {k: unseen_accuracy(lambda s, k=k: s.language == k) for k in ("en", "zh")},
        "by_question": {q: unseen_accuracy(lambda s, q=q: s.group == q) for q in sorted({s.group for s in unseen})},
    }
    return {
        "accuracy_with_image": overall["with_image"],
        "accuracy_blind": overall["blind"],
        "accuracy_shuffled": overall["shuffled"],
        "chance_level": round(sum(chance_level(s.info["attribute"]) for s in samples) / len(samples), 4),
        "n": len(samples),
        "by_attribute": {
            k: {**accuracies(lambda s, k=k: s.info["attribute"] == k), "chance": round(chance_level(k), 4)}
            for k in ("colour", "shape", "position")
        },
        "by_language": {k: accuracies(lambda s, k=k: s.language == k) for k in ("en", "zh")},
        "unseen_phrasings": unseen_phrasings,
        "blank": BLANK,
        "shuffled": f"{metrics['shuffled']['swapped']} of {len(samples)} questions asked about another held-out "
                    "image (same question), scored against that image's answer",
        "checkpoint": str(checkpoint),
        "examples": [{"question": r["prompt"].replace(IMAGE_MARKER, "").strip(), "expected": s.answer,
                      "answer": r["prediction"]} for s, r in zip(samples[:12], rows[:12])],
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
    print(f"demo: accuracy with the image {result['accuracy_with_image']:.3f}, with a blank image "
          f"{result['accuracy_blind']:.3f}, with shuffled images {result['accuracy_shuffled']:.3f}, chance "
          f"{result['chance_level']:.3f} (n={result['n']}, {time.time() - started:.0f} s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
