"""Evaluation speed: `evaluate.py`'s generation mode (three answers per sample: with the image, a blank image,
shuffled images; then the scoring). Prints one JSON line.

    python -m bench.evaluate                                  # the newest checkpoint under ./outputs (the demo's)
                                                              # on config.yaml's validation split
    python -m bench.evaluate --checkpoint outputs/qwen7b-coco --data data/processed/eval.jsonl \
        --limit 512 --batch-size 32

Figures: `load_s` (the checkpoint), `evaluate_s` (answers and scores of every sample), `samples_per_s` and
`answers_per_s` over `evaluate_s`, `cpu_s` (this process's CPU time during the evaluation).
"""

from __future__ import annotations

import argparse
import time

from bench.harness import device_name, emit, versions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", help="default: the newest bundle under ./outputs")
    parser.add_argument("--data", help="processed JSONL (default: the validation split of --config)")
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device")
    args = parser.parse_args(argv)

    from evaluation.runner import evaluate_samples
    from evaluation.samples import read_processed, validation_split
    from inference import load_checkpoint

    data = args.data or validation_split(args.config)
    samples = read_processed(data, limit=args.limit)
    start = time.perf_counter()
    loaded = load_checkpoint(args.checkpoint, device=args.device)
    load_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    evaluate_samples(loaded, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    record = {
        "bench": "evaluate",
        "checkpoint": str(loaded.folder),
        "data": str(data),
        "samples": len(samples),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "load_s": round(load_s, 1),
        "evaluate_s": round(seconds, 1),
        "samples_per_s": round(len(samples) / seconds, 3),
        "answers_per_s": round(3 * len(samples) / seconds, 3),
        "cpu_s": round(cpu, 1),
        "device": device_name(loaded.device),
        **versions(),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
