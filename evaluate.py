"""Measure a trained checkpoint: caption metrics (English and Chinese), short-answer accuracy, image reliance.

    python evaluate.py                                   # newest checkpoint under ./outputs,
                                                         # the config's validation split
    python evaluate.py --checkpoint DIR --data FILE.jsonl [--limit N] [--batch-size B] [--output DIR]
    python evaluate.py --predictions PRED.jsonl [--output DIR]      # score existing predictions, no model

Generation mode asks each sample of a processed JSONL (process_image.py's output) its first question, greedily
and in batches, three times: with its image, with a blank image and with another sample's image (a seeded
derangement), then scores the answers (see evaluation/). Predictions mode scores rows
{"id", "language": "en" | "zh", "prediction", "references": [...], "kind"?: "caption" | "qa", "answer"?}.
A sample whose image is missing or cannot be decoded is skipped before the model loads, counted in
metrics.json ("skipped") and on stderr, and the rest is scored.
Both print one JSON object (metrics.json) and write metrics.json, predictions.jsonl and report.md into the
output folder (default: `<checkpoint>/eval-<data name>`, or `<predictions name>-scored` beside the
predictions file), each file whole: on any failure no file there changes. Exit status: 0 on success, 2 for bad
input (a bad line of an input file, an output folder that cannot be written, ...), 1 when the results could
not be written (disk full, say); each failure is one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--predictions", help="score this JSONL of predictions (no model is loaded)")
    parser.add_argument("--config", help="config whose data section names the validation split (default: config.yaml)")
    parser.add_argument("--checkpoint", help="a bundle or merged export (default: the newest under ./outputs)")
    parser.add_argument("--data", help="processed JSONL to evaluate (default: the config's validation split)")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N samples only")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled-image pairing")
    parser.add_argument("--output", help="folder for metrics.json, predictions.jsonl, report.md")
    parser.add_argument("--ptb", action="store_true", help="English: the official PTB tokenizer (needs java)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--llm-path", help="the base LLM folder, if not where the checkpoint recorded it")
    parser.add_argument("--vision-path", help="the vision tower folder, if not where the checkpoint recorded it")
    parser.add_argument("--quantization", help="how the LLM's linear weights are held: nf4 (4-bit, needs bitsandbytes) "
                        "or none (default: as the checkpoint was trained)")
    return parser.parse_args(argv)


def check_output(output: Path, inputs: list[Path]) -> None:
    """An output is never one of the inputs, and the output folder is a folder this process can write (or create),
    checked before any model loads."""
    from common.paths import same_file
    from evaluation.report import OUTPUT_FILES

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    for path in inputs:
        if any(same_file(output / name, path) for name in OUTPUT_FILES):
            raise UsageError(f"the output folder {output} would overwrite the input {path}: pass another --output")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot create the output folder {output}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the output folder {output}: {existing} is not writable (pass another --output)")


def run_predictions(args) -> tuple[dict, list[dict], Path]:
    from evaluation.runner import score_predictions
    from evaluation.samples import read_predictions

    source = Path(args.predictions)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}-scored")
    check_output(output, [source])
    rows = read_predictions(source)
    metrics, scored = score_predictions(rows, ptb=args.ptb)
    metrics["settings"] = {"predictions": str(source)}
    return metrics, scored, output


def run_generation(args) -> tuple[dict, list[dict], Path]:
    from evaluation.samples import read_processed, skipped_summary, usable_samples, validation_split
    from inference import find_checkpoint

    data = Path(args.data) if args.data else validation_split(args.config or "config.yaml")
    checkpoint = find_checkpoint(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint / f"eval-{data.stem}"
    check_output(output, [data])
    samples, skipped = usable_samples(read_processed(data, limit=args.limit))
    if skipped:
        first = skipped[0]
        print(f"evaluate.py: skipping {len(skipped)} of {len(samples) + len(skipped)} samples, an image cannot be "
              f"loaded (first: sample {first['id']}: {first['image']}: {first['reason']})", file=sys.stderr)
    if not samples:
        raise UsageError(f"no samples to evaluate in {data}" + (" (every one was skipped)" if skipped else ""))
    from evaluation.runner import evaluate_samples  # torch: only once the inputs are known to be good
    from inference import load_checkpoint

    loaded = load_checkpoint(checkpoint, device=args.device, llm_path=args.llm_path, vision_path=args.vision_path,
                             quantization=args.quantization)
    started = time.perf_counter()
    metrics, rows = evaluate_samples(loaded, samples, seed=args.seed, ptb=args.ptb, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - started
    print(f"evaluate.py: {len(samples)} samples x 3 passes in {seconds:.1f} s "
          f"({len(samples) / seconds:.2f} samples/s, {3 * len(samples) / seconds:.2f} answers/s)"
          + (f"; {len(skipped)} samples skipped (metrics.json: skipped)" if skipped else ""), file=sys.stderr)
    metrics["settings"].update(checkpoint=str(checkpoint), data=str(data))
    metrics["skipped"] = skipped_summary(skipped)
    return metrics, rows, output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from settings import ConfigError
    from visual import ImageLoadError

    try:
        if args.ptb:
            from evaluation.text import java_available

            if not java_available():
                raise UsageError("--ptb needs `java` on PATH (e.g. apt-get install default-jre)")
        if args.predictions:
            model_flags = [f for f in ("config", "checkpoint", "data", "limit", "device", "llm_path", "vision_path",
                                               "quantization")
                           if getattr(args, f) is not None]
            if model_flags:
                raise UsageError(f"--predictions scores a file without a model: --{model_flags[0].replace('_', '-')} "
                                 "does not apply")
            metrics, rows, output = run_predictions(args)
        else:
            metrics, rows, output = run_generation(args)
    except (UsageError, ConfigError, ImageLoadError, OSError, ValueError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    from evaluation.report import write_outputs

    try:
        write_outputs(output, metrics, rows)
    except (OSError, UnicodeEncodeError) as e:  # disk full, no permission after all; nothing was changed
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"evaluate.py: error: cannot write the results into {output}: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, ensure_ascii=False))
    print(f"evaluate.py: wrote {output}/metrics.json, predictions.jsonl, report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
