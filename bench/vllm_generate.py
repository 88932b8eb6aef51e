"""Generation speed of the transformers-native export (`model.export --format llava`) served by vLLM.

    python -m bench.vllm_generate --size 7b --batch-sizes 1 32                    # GPU, bf16
    python -m bench.vllm_generate --size tiny --batch-sizes 1 8 --with-generate   # CPU (vLLM's CPU build), fp32

The same workload as `bench/generate.py` (our own model and `generate()`): each prompt is one image (256
placeholder tokens at 224 px) + text, about `--prompt-len` tokens in all (the measured length is printed), then
`--new-tokens` greedy tokens with no early stop. The model folder is what the llava export writes for the named
size (config.json, tokenizer, chat template, processor and generation configs) without weights: vLLM's
`load_format="dummy"` fills them with random values, which does not change the speed. Prefix caching is off,
so every round computes its prefill. Prefill = one `generate` with 1 new token; decode tokens/s =
batch * (new_tokens - 1) / (time of a full `generate` - prefill).

vLLM runs in its own environment (`--vllm-python`: $VLLM_PYTHON, else .venv-vllm/bin/python of this checkout,
which `bash bench/vllm_env.sh` builds, else this interpreter), in a subprocess (bench/vllm_timing.py).
`--with-generate` first times `bench/generate.py` on the same workload in this process (the same prompt length,
new tokens, batch sizes and repeats, in its dtype: bf16 on a GPU, fp32 on CPU, the default --dtype here) and
prints its JSON line, so that both rows come from one run on one
machine. Prints one JSON line for vLLM. Exit status 2 when vLLM does not import with --vllm-python, 1 when its
run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import generate as bench_generate
from bench.harness import SIZES, emit
from common.fileio import write_json, write_text
from demo.check_export import default_vllm_python, vllm_missing
from qwen import DEFAULT_SYSTEM, QWenTokenizer
from qwen.published_vocab import published_or_tiny_vocab
from visual import ImagePreprocessor

TIMING_SIDE = Path(__file__).resolve().parent / "vllm_timing.py"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def write_model_folder(size: str, folder: Path, dtype: torch.dtype) -> tuple[Path, int]:
    """A `--format llava` export of the named size without weights (see the module docstring), and its image
    token count."""
    # transformers' models load here, not at the top: seconds that --help and the vLLM check do without
    from transformers import CLIPVisionConfig

    from llm.qwen1 import qwen2_text_config
    from model.export_llava import llava_config, write_processing_files
    from qwen import QWenConfig
    from qwen.fast_tokenizer import build_fast_tokenizer
    from visual import CLIPVisionTower, num_image_tokens

    spec = SIZES[size]
    qwen = QWenConfig(**spec["qwen"])
    vision = CLIPVisionConfig(**spec["clip"])
    vocab, _ = published_or_tiny_vocab(folder)
    tokenizer = QWenTokenizer(vocab)
    strategy = CLIPVisionTower.feature_select_strategy
    config = llava_config(qwen2_text_config(qwen), vision, image_token_id=tokenizer.image_token_id,
                          select_strategy=strategy, vision_feature_layer=-2, dtype=dtype)
    model_dir = folder / f"llava-{size}"
    model_dir.mkdir()
    write_text(model_dir / "config.json", config.to_json_string())
    size_px = vision.image_size
    tokenizer_json = build_fast_tokenizer(vocab).to_str(pretty=True)
    write_processing_files(model_dir, tokenizer=tokenizer, tokenizer_json=tokenizer_json, system_prompt=DEFAULT_SYSTEM,
                           preprocessor=ImagePreprocessor(size=size_px, crop_size=(size_px, size_px)),
                           patch_size=vision.patch_size, select_strategy=strategy, model_max_length=qwen.seq_length,
                           vocab_size=qwen.vocab_size)
    return model_dir, num_image_tokens(vision)


def make_prompt(processor, image, prompt_len: int) -> tuple[str, int]:
    """A chat prompt with one image whose token count (placeholders included) is the first to reach prompt_len."""
    words = 0
    while True:
        words += 1
        text = " ".join(["picture"] * words)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        n = len(processor(text=prompt, images=[image])["input_ids"][0])
        if n >= prompt_len:
            return prompt, n


def main(argv: list[str] | None = None) -> dict:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if on_gpu else "fp32",
                        help="default: bf16 on a GPU, fp32 on CPU (bench/generate.py's choice)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--vllm-python", default=default_vllm_python(),
                        help="the Python of vLLM's environment (default: $VLLM_PYTHON, else .venv-vllm/bin/python "
                             "of this checkout when it exists, else this interpreter)")
    parser.add_argument("--with-generate", action="store_true",
                        help="also time bench/generate.py on the same workload first (its JSON line is printed)")
    args = parser.parse_args(argv)
    missing = vllm_missing(args.vllm_python)
    if missing:
        print(f"vllm_generate: error: {missing}", file=sys.stderr)
        sys.exit(2)
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        tmp = Path(tmp)
        model_dir, image_tokens = write_model_folder(args.size, tmp, DTYPES[args.dtype])
        processor = AutoProcessor.from_pretrained(model_dir)
        size_px = processor.image_processor.crop_size["height"]
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size_px, size_px, 3), dtype=np.uint8))
        image.save(tmp / "image.png")
        prompt, prompt_tokens = make_prompt(processor, image, args.prompt_len)
        if args.with_generate:
            bench_generate.main(["--size", args.size, "--device", "cuda" if on_gpu else "cpu", "--batch-sizes",
                                 *map(str, args.batch_sizes), "--prompt-len", str(prompt_tokens), "--new-tokens",
                                 str(args.new_tokens), "--repeats", str(args.repeats)])
        write_json(tmp / "settings.json", {
            "model": str(model_dir), "image": str(tmp / "image.png"), "prompt": prompt,
            "dtype": str(DTYPES[args.dtype]).removeprefix("torch."),
            "max_model_len": prompt_tokens + args.new_tokens + 16,
            "batch_sizes": args.batch_sizes, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "gpu_memory_utilization": args.gpu_memory_utilization, "output": str(tmp / "timing.json")})
        # PYTHONSAFEPATH: bench/ is not put on the side's sys.path (its modules would shadow installed ones)
        code = subprocess.run([args.vllm_python, str(TIMING_SIDE), str(tmp / "settings.json")], check=False,
                              env={**os.environ, "PYTHONSAFEPATH": "1"}).returncode
        if code != 0:
            print(f"vllm_generate: error: the vLLM process failed (exit status {code}; its message is above)",
                  file=sys.stderr)
            sys.exit(1)
        timing = json.loads((tmp / "timing.json").read_text(encoding="utf-8"))
    record = {
        "bench": "vllm_generate",
        "device": timing.pop("device"),
        "versions": timing.pop("versions"),
        "config": {"size": args.size, "prompt_tokens": prompt_tokens, "image_tokens": image_tokens,
                   "new_tokens": args.new_tokens, "dtype": args.dtype, "weights": "dummy (random)",
                   "prefix_caching": False},
        **timing,
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
