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
import os
import sys
import threading
from pathlib import Path

IMAGE_MARK = "<image>"
TAG = "<|extra_0|>"  # dataset.conversation.IMAGE_TAG (not imported here: --help stays instant)


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def latest_checkpoint(root: Path = Path("outputs")) -> Path:
    found = sorted(root.glob("**/vlm_config.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise UsageError(f"no trained checkpoint found under {root}/ (run `bash train.sh`, or pass --checkpoint DIR)")
    return found[-1].parent


def make_query(prompt: str, n_images: int) -> str:
    """The user text with one image tag per image: at each `<image>`, or all in front."""
    if TAG in prompt:  # user text never becomes special tokens, and a typed tag would be read as an image slot
        raise UsageError(f"the prompt contains {TAG}: write {IMAGE_MARK} where an image goes")
    marks = prompt.count(IMAGE_MARK)
    if marks == 0:
        return "".join(f"{TAG}\n" for _ in range(n_images)) + prompt
    if marks != n_images:
        raise UsageError(f"the prompt has {marks} {IMAGE_MARK} mark(s) but {n_images} image(s) were given")
    return prompt.replace(IMAGE_MARK, TAG)


class Answerer:
    """Loads a checkpoint once; answers prompts (batched) with the shared generation path."""

    def __init__(self, checkpoint: Path, device: str | None = None, llm_path=None, vision_path=None):
        import torch

        from model import load_vlm
        from qwen import QWenTokenizer
        from visual import CLIPImagePreprocessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.model, self.config = load_vlm(checkpoint, dtype=dtype, llm_path=llm_path, vision_path=vision_path)
        self.model.to(self.device).eval()
        recorded_llm, recorded_vision = self.config.resolve(checkpoint)
        llm_path, vision_path = llm_path or recorded_llm, vision_path or recorded_vision
        self.tokenizer = QWenTokenizer.from_pretrained(llm_path)
        self.processor = CLIPImagePreprocessor.from_pretrained(vision_path)

    def answer(self, items: list[tuple[str, list[str]]], *, system: str | None, streamer=None, **gen) -> list[str]:
        from model.generation import Prompt, generate_answers
        from visual import load_image

        prompts = [Prompt(make_query(text, len(paths)), [load_image(p) for p in paths]) for text, paths in items]
        return generate_answers(
            self.model, self.tokenizer, self.processor, prompts,
            system=self.config.system_prompt if system is None else system,
            num_image_tokens=self.config.num_image_tokens, streamer=streamer, **gen,
        )


def run_single(answerer: Answerer, args) -> None:
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if not args.stream:
        print(answerer.answer([(args.prompt, args.image)], system=args.system, **gen)[0])
        return
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(answerer.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors = []

    def work():
        try:
            answerer.answer([(args.prompt, args.image)], system=args.system, streamer=streamer, **gen)
        except Exception as e:  # reported after the stream closes
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work)
    thread.start()
    for piece in streamer:
        print(piece, end="", flush=True)
    thread.join()
    print()
    if errors:
        raise errors[0]


def run_batch(answerer: Answerer, args) -> int:
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
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    bad_input = (ImageLoadError, UsageError, ValueError)

    def answer_all(chunk) -> list:
        """Answers (or the exception of a bad line) for a chunk; a failing batch is retried line by line."""
        try:
            return answerer.answer([(prompt, images) for _, prompt, images in chunk], system=args.system, **gen)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    os.replace(tmp, out)
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

    from visual import ImageLoadError

    try:
        if args.batch:
            if not args.output:
                raise UsageError("--batch needs --output FILE.jsonl")
        elif args.prompt is None:
            raise UsageError("--prompt is required (or --batch FILE --output FILE)")
        else:
            make_query(args.prompt, len(args.image))  # a wrong <image> count fails before the model loads
            for path in args.image:
                if not Path(path).is_file():
                    raise UsageError(f"image not found: {path}")
        checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint()
        if not (checkpoint / "vlm_config.json").is_file():
            raise UsageError(f"not a checkpoint folder (no vlm_config.json): {checkpoint}")
        answerer = Answerer(checkpoint, args.device, args.llm_path, args.vision_path)
        if args.batch:
            return run_batch(answerer, args)
        run_single(answerer, args)
        return 0
    except (UsageError, ImageLoadError, FileNotFoundError, ValueError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
