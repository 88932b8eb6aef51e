"""Does the trained demo model use the image? `python -m demo.evaluate --config config.yaml [train flags]`

Asks every held-out question (colour, shape, corner; English and Chinese) about every held-out image, once
with the image and once with the image blanked, and writes `<output_dir>/demo_eval.json`:
{"accuracy_with_image", "accuracy_blind", "n", per-attribute and per-language accuracies, "blank"}.
The blank image is mean grey: every pixel CLIP's mean colour, i.e. all zeros after normalisation, so the
model sees an image with no content and can only fall back on its priors.
An answer counts when it names exactly the expected label (`demo.synthetic.normalise_answer`).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from common.fileio import write_json
from demo.synthetic import normalise_answer
from inference import Prompt, load_checkpoint
from qwen import IMAGE_TAG
from settings import ConfigError
from settings.training import parse_train_args
from visual import load_image

BLANK = "mean grey (CLIP's mean colour: zeros after normalisation)"


def evaluate(checkpoint: Path, heldout_file: Path, batch_size: int = 64) -> dict:
    loaded = load_checkpoint(checkpoint, device="cpu")
    rows = json.loads(heldout_file.read_text(encoding="utf-8"))
    items = []
    for row in rows:
        image = load_image(heldout_file.parent / row["image"])
        for q in row["questions"]:
            items.append((image, q))

    scores = {"with_image": defaultdict(list), "blind": defaultdict(list)}
    examples = []
    for mode, override in (("with_image", None), ("blind", torch.zeros_like)):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [Prompt(f"{IMAGE_TAG}\n{q['question']}", [image]) for image, q in chunk]
            answers = loaded.generate(prompts, max_new_tokens=12, pixel_override=override, repetition_penalty=1.0)
            for (_, q), answer in zip(chunk, answers):
                ok = normalise_answer(answer, q["lang"]) == normalise_answer(q["answer"], q["lang"])
                for key in ("all", q["attribute"], q["lang"]):
                    scores[mode][key].append(ok)
                if mode == "with_image" and len(examples) < 12:
                    examples.append({"question": q["question"], "expected": q["answer"], "answer": answer})

    def acc(values):
        return round(sum(values) / len(values), 4) if values else None

    return {
        "accuracy_with_image": acc(scores["with_image"]["all"]),
        "accuracy_blind": acc(scores["blind"]["all"]),
        "n": len(items),
        "by_attribute": {
            k: {"with_image": acc(scores["with_image"][k]), "blind": acc(scores["blind"][k])}
            for k in ("colour", "shape", "position")
        },
        "by_language": {
            k: {"with_image": acc(scores["with_image"][k]), "blind": acc(scores["blind"][k])} for k in ("en", "zh")
        },
        "blank": BLANK,
        "checkpoint": str(checkpoint),
        "examples": examples,
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
          f"{result['accuracy_blind']:.3f} (n={result['n']}, {time.time() - started:.0f} s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
