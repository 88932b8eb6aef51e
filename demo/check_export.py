"""Does a `--format llava` export answer like infer.py? Greedy answers of both, side by side.

    python -m demo.check_export --checkpoint outputs/demo --export exported-demo \\
        --image a.png --image photo.jpg --prompt "What colour is the shape?" --prompt "图形是什么颜色？"

Every prompt is asked about every image (the image in front of the prompt, infer.py's layout without <image>
marks), twice: by `infer.py --batch` on the checkpoint (our code), and by a separate Python process that uses
transformers alone on the exported folder (`AutoModelForImageTextToText`, `AutoProcessor`, the folder's chat
template and generation_config.json); that process checks at its end that no module of this repository was
imported. Prints each pair and the count of identical answers; exit status 0 when all are identical, 1 when
some differ, 2 for bad input (a missing file, a folder that is not a `--format llava` export, a checkpoint
infer.py refuses) or a failed run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common.fileio import write_text

REPO = Path(__file__).resolve().parent.parent
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"

# Runs in its own interpreter: transformers and PIL only. argv: export folder, requests JSONL, answers JSONL,
# max new tokens, JSON list of this repository's top-level module names (none of which may be imported).
STOCK_TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, requests, answers, max_new_tokens, ours = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
rows = [json.loads(line) for line in open(requests, encoding="utf-8")]
with open(answers, "w", encoding="utf-8") as out:
    for row in rows:
        content = [{"type": "image", "path": p} for p in row["images"]] + [{"type": "text", "text": row["prompt"]}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        text = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.write(json.dumps({"id": row["id"], "answer": text}, ensure_ascii=False) + "\n")
imported = sorted(name for name in sys.modules if name.split(".")[0] in set(json.loads(ours)))
assert not imported, f"the stock-transformers side imported this repository's modules: {imported}"
"""


def our_module_names() -> list[str]:
    """The top-level packages and modules of this repository (what the stock side must not import)."""
    return sorted({p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")})


def bad_input(args: argparse.Namespace) -> str | None:
    """The first problem with the command line, in one line; None when there is none."""
    missing = [p for p in [*args.image, args.checkpoint, args.export] if not Path(p).exists()]
    if missing:
        return f"not found: {missing[0]}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: must be at least 1"
    try:
        architectures = json.loads((Path(args.export) / "config.json").read_text(encoding="utf-8"))["architectures"]
    except (OSError, ValueError, KeyError, TypeError):
        architectures = []
    if LLAVA_ARCHITECTURE not in architectures:
        return f"--export {args.export} is not a `python -m model.export --format llava` folder (no {LLAVA_ARCHITECTURE})"
    return None


def _answers(path: Path) -> dict:
    return {row["id"]: row.get("answer", row.get("error")) for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="the bundle that was exported")
    parser.add_argument("--export", required=True, help="the folder `python -m model.export --format llava` wrote")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat)")
    parser.add_argument("--prompt", action="append", required=True, help="a question (repeat)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    problem = bad_input(args)
    if problem:
        print(f"check_export: error: {problem}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="check-export-") as tmp:
        tmp = Path(tmp)
        requests = [{"id": f"{i}-{j}", "images": [str(Path(image).resolve())], "prompt": prompt}
                    for i, image in enumerate(args.image) for j, prompt in enumerate(args.prompt)]
        write_text(tmp / "requests.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests))
        runs = {
            "infer.py": [sys.executable, str(REPO / "infer.py"), "--checkpoint", str(Path(args.checkpoint).resolve()),
                         "--device", "cpu", "--batch", str(tmp / "requests.jsonl"), "--output", str(tmp / "ours.jsonl"),
                         "--batch-size", "1", "--max-new-tokens", str(args.max_new_tokens)],
            "the stock-transformers process": [
                sys.executable, "-c", STOCK_TRANSFORMERS, str(Path(args.export).resolve()), str(tmp / "requests.jsonl"),
                str(tmp / "stock.jsonl"), str(args.max_new_tokens), json.dumps(our_module_names())],
        }
        for name, command in runs.items():
            code = subprocess.run(command, check=False, cwd=tmp).returncode
            if code != 0:
                print(f"check_export: error: {name} failed (exit status {code}; its message is above)", file=sys.stderr)
                return 2
        ours, stock = _answers(tmp / "ours.jsonl"), _answers(tmp / "stock.jsonl")

    same = 0
    for request in requests:
        a, b = ours[request["id"]], stock[request["id"]]
        same += a == b
        mark = "same" if a == b else "DIFF"
        print(f"[{mark}] {Path(request['images'][0]).name} | {request['prompt']}\n    infer.py: {a!r}\n    export:   {b!r}")
    print(f"identical answers: {same} of {len(requests)}")
    return 0 if same == len(requests) else 1


if __name__ == "__main__":
    sys.exit(main())
