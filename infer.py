"""Ask the trained model about images.

    python infer.py --image photo.jpg --prompt "What is unusual about this image?"
    python infer.py --image a.jpg --image b.jpg --prompt "<image> vs <image>: which is brighter?" --stream
    python infer.py --batch prompts.jsonl --output answers.jsonl        # {"id", "images", "prompt"} per line

Images go where the prompt says `<image>`; with no `<image>` in the prompt, they go before it, one per line
(the layout used in training). The checkpoint is a training bundle or a merged export; by default the most
recently written one under ./outputs. Every input is checked before the model loads: the options, each image
(it exists and decodes), the prompt's `<image>` count, and in batch mode every row (see inference/batch.py).
Exit status: 0 on success, 2 for bad input (a missing or broken image, a checkpoint that is not one, a prompt
whose `<image>` count differs from the images given, `--device cuda` without a GPU, a negative temperature,
an --output that is a folder, one of the inputs, not this batch's answers or not writable), and in batch mode
0 even when some rows failed: each failed row gets an "error" field instead of an "answer"; 1 when the answers
could not be written part way (disk full): the lines written are kept. Batch answers are appended to --output
as they are produced; a rerun answers only the ids that are not in it yet (inference/batch.py says how an
output is recognised as this batch's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def check_options(args) -> None:
    """Option values that would fail late or silently do something else."""
    import math

    if math.isnan(args.temperature) or math.isinf(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or a positive number")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def prompts_of(items: list[tuple[str, list[str]]]):
    """Typed (prompt, image paths) pairs -> generation prompts, images loaded (ImageLoadError, PromptError)."""
    from inference import Prompt, query_with_images
    from visual import load_image

    return [Prompt(query_with_images(text, len(paths)), [load_image(p) for p in paths]) for text, paths in items]


def run_single(loaded, prompts, args) -> None:
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "system": args.system}
    prompt = prompts[0]
    if not args.stream:
        print(loaded.generate([prompt], **gen)[0])
        return
    shown = ""
    for text in loaded.stream(prompt, **gen):
        if text.startswith(shown):  # the last value is the finished answer (stripped): nothing more to print
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()


def check_image(path: str) -> None:
    """The image exists and decodes (JPEGs at reduced scale: the check of process_image.py)."""
    from visual import load_image

    load_image(path, draft_size=(1, 1))


def read_checked_batch(args):
    """The batch file's rows, checked (images aside), and an --output that is no folder and none of the inputs."""
    from common.paths import same_file
    from inference.batch import BatchError, read_batch

    if not args.output:
        raise UsageError("--batch needs --output FILE.jsonl")
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name a file of JSON Lines")
    if not output.absolute().parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.absolute().parent} does not exist")
    try:
        rows = read_batch(args.batch)
    except BatchError as e:
        raise UsageError(str(e)) from e
    inputs = [("the batch file", args.batch)] + [("an image", p) for row in rows for p in row.images]
    for label, path in inputs:
        if same_file(output, path):
            raise UsageError(f"--output {output} is {label} ({path}): an output is never one of the inputs")
    return rows


def chunk_answerer(loaded, args):
    """answer(rows) -> one answer per row, or the exception of a row that failed (a failing chunk is retried row
    by row)."""
    from inference import PromptError
    from visual import ImageLoadError

    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "system": args.system}
    bad_input = (ImageLoadError, PromptError, ValueError)

    def answer(chunk) -> list:
        try:
            return loaded.generate(prompts_of([(row.prompt, row.images) for row in chunk]), **gen)
        except bad_input as e:
            if len(chunk) == 1:
                return [e]
            return [answer([row])[0] for row in chunk]

    return answer


def run_batch(args) -> int:
    """Check the rows and open the output (it is this batch's, and it can be written) before the model loads,
    then answer the rows it has no line for, chunk by chunk."""
    from inference import load_checkpoint
    from inference.batch import answer_rows, check_images, id_key, open_answers

    rows = read_checked_batch(args)
    with open_answers(args.output, rows) as answers:
        todo = [row for row in rows if id_key(row.id) not in answers.done]
        check_images(todo, check_image)  # decoding is the slow part: not again for the rows already done
        if not todo:
            print(f"all {len(rows)} prompts already have a line in {args.output}: nothing to do")
            return 0
        loaded = load_checkpoint(args.checkpoint, device=args.device, llm_path=args.llm_path,
                                 vision_path=args.vision_path, quantization=args.quantization)
        answered, failed = answer_rows(todo, chunk_answerer(loaded, args), answers, args.batch_size)
    skipped = len(rows) - len(todo)
    print(f"answered {answered} of {len(todo)} prompts -> {args.output}" + (f" ({failed} failed)" if failed else "")
          + (f"; {skipped} already in it, skipped" if skipped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--prompt", help="the question; <image> marks where each image goes")
    parser.add_argument("--checkpoint", help="a bundle or merged export (default: the newest under ./outputs)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--system", help="system prompt (default: the one the model was trained with)")
    parser.add_argument("--batch", help="JSON Lines of {id, images, prompt}: answer them all")
    parser.add_argument("--output", help="with --batch: the JSON Lines file of answers (appended to: a rerun "
                        "answers only the ids it does not have yet)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--llm-path", help="the base LLM folder, if not where the checkpoint recorded it")
    parser.add_argument("--vision-path", help="the vision tower folder, if not where the checkpoint recorded it")
    parser.add_argument("--quantization", help="how the LLM's linear weights are held: nf4 (4-bit, needs bitsandbytes) "
                        "or none (default: as the checkpoint was trained)")
    args = parser.parse_args(argv)

    # Imported after the arguments are parsed: torch and transformers take seconds, `--help` should not.
    from inference import load_checkpoint
    from inference.batch import AnswersWriteError
    from visual import ImageLoadError

    try:
        check_options(args)
        # Everything about the input is checked before the model loads (seconds to minutes).
        if args.batch:
            return run_batch(args)
        if args.prompt is None:
            raise UsageError("--prompt is required (or --batch FILE --output FILE)")
        prompts = prompts_of([(args.prompt, args.image)])  # a missing or broken image, a wrong <image> count
        loaded = load_checkpoint(args.checkpoint, device=args.device, llm_path=args.llm_path,
                                 vision_path=args.vision_path, quantization=args.quantization)
        run_single(loaded, prompts, args)
        return 0
    except (UsageError, ImageLoadError, FileNotFoundError, ValueError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    except AnswersWriteError as e:  # disk full part way: the answers written so far stay
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
