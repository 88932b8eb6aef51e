"""Ask the trained model about images.

    python infer.py --image photo.jpg --prompt "What is unusual about this image?"
    python infer.py --image a.jpg --image b.jpg --prompt "<image> vs <image>: which is brighter?" --stream
    python infer.py --batch prompts.jsonl --output answers.jsonl        # {"id", "images", "prompt"} per line

Images go where the prompt says `<image>`; with no `<image>` in the prompt, they go before it, one per line
(the layout used in training). The checkpoint is a training bundle or a merged export; by default the most
recently written one under ./outputs. Exit status: 0 on success, 2 for bad input (a missing image, a
checkpoint that is not one, a prompt whose `<image>` count differs from the images given), and in batch
mode 0 even when some lines failed: each failed line gets an "error" field instead of an "answer".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.fileio import write_text


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def prompts_of(items: list[tuple[str, list[str]]]):
    """Typed (prompt, image paths) pairs -> generation prompts, images loaded (ImageLoadError, PromptError)."""
    from inference import Prompt, query_with_images
    from visual import load_image

    return [Prompt(query_with_images(text, len(paths)), [load_image(p) for p in paths]) for text, paths in items]


def run_single(loaded, args) -> None:
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "system": args.system}
    prompt = prompts_of([(args.prompt, args.image)])[0]
    if not args.stream:
        print(loaded.generate([prompt], **gen)[0])
        return
    shown = ""
    for text in loaded.stream(prompt, **gen):
        if text.startswith(shown):  # the last value is the finished answer (stripped): nothing more to print
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()


def run_batch(loaded, args) -> int:
    from inference import PromptError
    from visual import ImageLoadError

    source = Path(args.batch)
    if not source.is_file():
        raise UsageError(f"batch file not found: {source}")
    jobs, results = [], []
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item_id = row.get("id", n)
            jobs.append((item_id, row["prompt"], list(row.get("images", []))))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            results.append({"id": n, "error": f"line {n}: not a {{prompt, images}} object ({e})"})
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "system": args.system}
    bad_input = (ImageLoadError, PromptError, ValueError)

    def answer_all(chunk) -> list:
        """Answers (or the exception of a bad line) for a chunk; a failing batch is retried line by line."""
        try:
            return loaded.generate(prompts_of([(prompt, images) for _, prompt, images in chunk]), **gen)
        except bad_input as e:
            if len(chunk) == 1:
                return [e]
            return [answer_all([job])[0] for job in chunk]

    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        for (item_id, _, _), value in zip(chunk, answer_all(chunk)):
            key = "error" if isinstance(value, Exception) else "answer"
            results.append({"id": item_id, key: str(value)})
    out = Path(args.output)
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    failed = sum("error" in r for r in results)
    print(f"answered {len(results) - failed} of {len(results)} prompts -> {out}" + (f" ({failed} failed)" if failed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--prompt", help="the question; <image> marks where each image goes")
    parser.add_argument("--checkpoint", help="a bundle or merged export (default: the newest under ./outputs)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--system", help="system prompt (default: the one the model was trained with)")
    parser.add_argument("--batch", help="JSON Lines of {id, images, prompt}: answer them all")
    parser.add_argument("--output", help="with --batch: the JSON Lines file of answers to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--llm-path", help="the base QWen folder, if not where the checkpoint recorded it")
    parser.add_argument("--vision-path", help="the CLIP folder, if not where the checkpoint recorded it")
    args = parser.parse_args(argv)

    # Imported after the arguments are parsed: torch and transformers take seconds, `--help` should not.
    from inference import load_checkpoint, query_with_images
    from visual import ImageLoadError

    try:
        if args.batch:
            if not args.output:
                raise UsageError("--batch needs --output FILE.jsonl")
        elif args.prompt is None:
            raise UsageError("--prompt is required (or --batch FILE --output FILE)")
        else:
            query_with_images(args.prompt, len(args.image))  # a wrong <image> count fails before the model loads
            for path in args.image:
                if not Path(path).is_file():
                    raise UsageError(f"image not found: {path}")
        loaded = load_checkpoint(args.checkpoint, device=args.device, llm_path=args.llm_path, vision_path=args.vision_path)
        if args.batch:
            return run_batch(loaded, args)
        run_single(loaded, args)
        return 0
    except (UsageError, ImageLoadError, FileNotFoundError, ValueError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
