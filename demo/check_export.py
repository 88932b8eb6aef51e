"""Does a `--format llava` export answer like infer.py? Greedy answers of both, side by side.

    python -m demo.check_export --checkpoint outputs/demo --export exported-demo \\
        --image a.png --image photo.jpg --prompt "What colour is the shape?" --prompt "图形是什么颜色？"
    python -m demo.check_export ... --engine vllm       # the export served by vLLM (bash bench/vllm_env.sh)

Every prompt is asked about every image (the image in front of the prompt, infer.py's layout without <image>
marks), twice: by `infer.py --batch` on the checkpoint (our code), and by an engine that knows nothing of this
repository, in its own process, on the exported folder (its chat template and generation_config.json):

- `--engine transformers` (default): stock transformers in this environment (`AutoModelForImageTextToText`,
  `AutoProcessor`, fp32), demo/engines/transformers_answers.py;
- `--engine vllm`: vLLM's `LLM.chat` in vLLM's own environment (`--vllm-python`; default: $VLLM_PYTHON, else
  .venv-vllm/bin/python of this checkout, which `bash bench/vllm_env.sh` builds, else this interpreter), in the
  export's dtype, demo/engines/vllm_answers.py.

The engine's process checks at its end that no module of this repository was imported. Besides the answers, the
log-probabilities of the first answer token's `--top-logprobs` best candidates (the engine's) are compared with
our model's (fp32, the raw distribution before any token is suppressed): the largest difference is printed.
Prints each pair and the count of identical answers (vLLM's answer held back from an incomplete character on, a
U+FFFD in ours, counts as identical: `same_answer`); exit status 0 when all are identical, 1 when some differ,
2 for bad input (a missing file, a folder that is not a `--format llava` export, a checkpoint infer.py refuses,
an engine that cannot start, such as no vLLM at --vllm-python) or a failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common.fileio import write_text

REPO = Path(__file__).resolve().parent.parent
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
ENGINES = {"transformers": REPO / "demo" / "engines" / "transformers_answers.py",
           "vllm": REPO / "demo" / "engines" / "vllm_answers.py"}
DEFAULT_VLLM_VENV = REPO / ".venv-vllm"  # where `bash bench/vllm_env.sh` puts vLLM's environment


def our_module_names() -> list[str]:
    """The top-level packages and modules of this repository (what the engine's side must not import)."""
    return sorted({p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")})


def default_vllm_python() -> str:
    """$VLLM_PYTHON when set; else the interpreter of .venv-vllm in this checkout (`bash bench/vllm_env.sh`) when
    there is one; else this interpreter (vLLM installed in the project's environment, as on a GPU machine)."""
    venv_python = DEFAULT_VLLM_VENV / "bin" / "python"
    return os.environ.get("VLLM_PYTHON") or (str(venv_python) if venv_python.is_file() else sys.executable)


def vllm_missing(python: str) -> str | None:
    """Why `python` cannot run the vLLM side (one line), or None when vllm imports there."""
    if not Path(python).is_file():
        return f"no Python at {python} (build vLLM's environment with `bash bench/vllm_env.sh`, or pass --vllm-python)"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"vllm does not import with {python}: {last}"
    return None


def bad_input(args: argparse.Namespace) -> str | None:
    """The first problem with the command line, in one line; None when there is none."""
    missing = [p for p in [*args.image, args.checkpoint, args.export] if not Path(p).exists()]
    if missing:
        return f"not found: {missing[0]}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: must be at least 1"
    if args.top_logprobs < 1:
        return f"--top-logprobs {args.top_logprobs}: must be at least 1"
    try:
        architectures = json.loads((Path(args.export) / "config.json").read_text(encoding="utf-8"))["architectures"]
    except (OSError, ValueError, KeyError, TypeError):
        architectures = []
    if LLAVA_ARCHITECTURE not in architectures:
        return (f"--export {args.export} is not a `python -m model.export --format llava` folder "
                f"(no {LLAVA_ARCHITECTURE})")
    if args.engine == "vllm":
        return vllm_missing(args.vllm_python)
    return None


def same_answer(ours: str, engine: str) -> bool:
    """Whether two answers are the same text, or the engine's is ours cut at a U+FFFD: the bytes of a character
    that the generated tokens left incomplete, which infer.py and transformers write as U+FFFD and vLLM's
    detokenizer holds back, with everything after them, waiting for the rest (`tokenizers`' DecodeStream: nothing
    is shown while the text ends in an incomplete character). Only an answer cut by --max-new-tokens, or one with
    byte sequences that are no UTF-8 (an untrained model's), differs so."""
    held_back = ours[len(engine):] if ours.startswith(engine) else ""
    return ours == engine or held_back.lstrip().startswith("\ufffd")


def _rows(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def our_first_token_logprobs(checkpoint: str, requests: list[dict]) -> dict:
    """Per request id, our model's log-probabilities of the first answer token over the whole vocabulary (a tensor;
    fp32, CPU, nothing suppressed), with the prompt infer.py builds."""
    import torch

    from inference import Prompt, load_checkpoint, query_with_images
    from inference.generation import prompt_tensors
    from visual import load_image

    loaded = load_checkpoint(checkpoint, device="cpu")
    found = {}
    for request in requests:
        prompt = Prompt(query_with_images(request["prompt"], len(request["images"])),
                        [load_image(path) for path in request["images"]])
        input_ids, attention_mask, pixels = prompt_tensors([prompt], loaded.tokenizer, loaded.processor,
                                                           loaded.config.system_prompt,
                                                           loaded.config.vision.num_image_tokens)
        with torch.no_grad():
            logits = loaded.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
        found[request["id"]] = torch.log_softmax(logits[0, -1].float(), dim=-1)
    return found


def largest_logprob_difference(ours: dict, engine: dict[str, dict]) -> float:
    """The largest |engine - ours| over every request and every candidate the engine reported (`ours`: per request
    id, a tensor of log-probabilities over the vocabulary)."""
    return max((abs(value - float(ours[key][int(token)])) for key, row in engine.items()
                for token, value in row.get("first_token_logprobs", {}).items()), default=0.0)


def run_sides(args: argparse.Namespace, requests: list[dict], tmp: Path) -> tuple[dict, dict] | str:
    """Answers of infer.py and of the engine, per request id; or the message of the side that failed."""
    write_text(tmp / "requests.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests))
    python = args.vllm_python if args.engine == "vllm" else sys.executable
    runs = {
        "infer.py": [sys.executable, str(REPO / "infer.py"), "--checkpoint", str(Path(args.checkpoint).resolve()),
                     "--device", "cpu", "--batch", str(tmp / "requests.jsonl"), "--output", str(tmp / "ours.jsonl"),
                     "--batch-size", "1", "--max-new-tokens", str(args.max_new_tokens)],
        f"the {args.engine} process": [
            python, str(ENGINES[args.engine]), str(Path(args.export).resolve()), str(tmp / "requests.jsonl"),
            str(tmp / "engine.jsonl"), str(args.max_new_tokens), str(args.top_logprobs),
            json.dumps(our_module_names())],
    }
    for name, command in runs.items():
        code = subprocess.run(command, check=False, cwd=tmp).returncode
        if code != 0:
            return f"{name} failed (exit status {code}; its message is above)"
    return _rows(tmp / "ours.jsonl"), _rows(tmp / "engine.jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="the bundle that was exported")
    parser.add_argument("--export", required=True, help="the folder `python -m model.export --format llava` wrote")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeat)")
    parser.add_argument("--prompt", action="append", required=True, help="a question (repeat)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="transformers",
                        help="what answers on the export (default: transformers)")
    parser.add_argument("--vllm-python", default=default_vllm_python(),
                        help="with --engine vllm: the Python of vLLM's environment (default: $VLLM_PYTHON, else "
                             ".venv-vllm/bin/python of this checkout when it exists, else this interpreter)")
    parser.add_argument("--top-logprobs", type=int, default=5,
                        help="first-token candidates whose log-probabilities are compared (default: 5)")
    args = parser.parse_args(argv)
    problem = bad_input(args)
    if problem:
        print(f"check_export: error: {problem}", file=sys.stderr)
        return 2

    requests = [{"id": f"{i}-{j}", "images": [str(Path(image).resolve())], "prompt": prompt}
                for i, image in enumerate(args.image) for j, prompt in enumerate(args.prompt)]
    with tempfile.TemporaryDirectory(prefix="check-export-") as tmp:
        result = run_sides(args, requests, Path(tmp))
    if isinstance(result, str):
        print(f"check_export: error: {result}", file=sys.stderr)
        return 2
    ours, engine = result
    logprob_difference = largest_logprob_difference(our_first_token_logprobs(args.checkpoint, requests), engine)

    same = 0
    for request in requests:
        a = ours[request["id"]].get("answer", ours[request["id"]].get("error"))
        b = engine[request["id"]]["answer"]
        identical = isinstance(a, str) and same_answer(a, b)
        same += identical
        mark = "same" if identical else "DIFF"
        print(f"[{mark}] {Path(request['images'][0]).name} | {request['prompt']}\n    infer.py: {a!r}\n    "
              f"{args.engine}: {b!r}")
    print(f"first-token log-probabilities ({args.top_logprobs} best of {args.engine}), largest difference from "
          f"ours: {logprob_difference:.3g}")
    print(f"identical answers ({args.engine}): {same} of {len(requests)}")
    return 0 if same == len(requests) else 1


if __name__ == "__main__":
    sys.exit(main())
