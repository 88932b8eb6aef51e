"""Generation speed of a backbone pair: prefill time and decode tokens/s with the KV cache, at batch 1 and 8.

    python -m bench.generate --llm qwen-7b --vision clip-vit-l14           # GPU, bf16
    python -m bench.generate --llm qwen2.5-7b --vision siglip-so400m
    python -m bench.generate --llm tiny-qwen3 --vision tiny-siglip --device cpu

The pair is built with random weights in its published architecture (bench/harness.py: LLMS, VISIONS; `--size
7b|1.8b|tiny` is the older name of a QWen v1 + CLIP pair). Each prompt is one image (256 placeholder tokens for
CLIP ViT-L/14 at 224 px, 729 for SigLIP so400m at 384 px) + text, `--prompt-len` tokens in all (default: the
image + 64 text tokens). The prefill is one forward over the prompts (the tower runs once per image); decoding
then generates `--new-tokens` tokens per prompt with greedy search and no early stop. Prints one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: the checkout's root on the path instead of bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # whose modules would shadow top-level ones

from bench.requires import require_packages

require_packages("bench/generate.py")

import argparse
import time

import torch

from bench.harness import (
    add_backbone_arguments,
    backbone_pair,
    build_random_vlm,
    check_sample_length,
    device_name,
    emit,
    image_tokens,
    peak_memory_gb,
    reset_peak_memory,
    sync,
    synthetic_batch,
    versions,
)

TEXT_TOKENS = 64  # text tokens a prompt has by default (10 before the image): 256 + 64 = 320 with CLIP ViT-L/14


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_backbone_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="tokens per prompt, image tokens included (default: image tokens + 64: 320 with CLIP "
                             "ViT-L/14, 793 with SigLIP so400m)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        llm, vision = backbone_pair(args.size, args.llm, args.vision)
        prompt_len = args.prompt_len or image_tokens(vision) + TEXT_TOKENS
        check_sample_length(prompt_len, vision, "--prompt-len")
    except ValueError as e:
        parser.error(str(e))

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_random_vlm(llm, vision, device, dtype).eval()
    tower = model.vision_tower
    results = {}
    for batch_size in args.batch_sizes:
        batch = synthetic_batch(model, batch_size, prompt_len, 0.0, device, dtype)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        reset_peak_memory(device)
        prefill, total = [], []
        for _ in range(args.repeats + 1):  # the first round warms up
            with torch.no_grad():
                sync(device)
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                sync(device)
                t1 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
                sync(device)
                t2 = time.perf_counter()
            prefill.append(t1 - t0)
            total.append(t2 - t1)
        p = sorted(prefill[1:])[len(prefill[1:]) // 2]
        g = sorted(total[1:])[len(total[1:]) // 2]
        decode_seconds = max(g - p, 1e-9)  # generate() = one prefill + (new_tokens - 1) decode steps
        results[f"batch_{batch_size}"] = {
            "prefill_ms": round(p * 1000, 2),
            "decode_tokens_per_s": round(batch_size * (args.new_tokens - 1) / decode_seconds, 1),
            "ms_per_decode_step": round(decode_seconds / (args.new_tokens - 1) * 1000, 3),
            "peak_memory_gb": round(peak_memory_gb(device), 2),
        }
    record = {
        "bench": "generate",
        "device": device_name(device),
        "versions": versions(),
        "config": {"llm": llm, "vision": vision, "prompt_len": prompt_len, "image_tokens": tower.num_patches,
                   "new_tokens": args.new_tokens, "dtype": str(dtype).replace("torch.", ""), "cache": "DynamicCache"},
        **results,
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
