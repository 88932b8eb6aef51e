"""LoRA training-step throughput and memory of a backbone pair's full architecture, on synthetic batches.

    python -m bench.train_step --llm qwen-7b --vision clip-vit-l14 --batch-size 8     # GPU, bf16
    python -m bench.train_step --llm qwen2.5-7b --vision siglip-so400m --batch-size 8
    python -m bench.train_step --llm qwen-7b --vision clip-vit-l14 --batch-size 1 --gradient-checkpointing
    python -m bench.train_step --llm tiny-qwen2.5 --vision tiny-siglip --device cpu
    python -m bench.train_step --llm qwen-7b --vision clip-vit-l14 --batch-size 1 --gradient-checkpointing \
        --quantization nf4

The pair is built with random weights in its published architecture (bench/harness.py: LLMS, VISIONS; `--size
7b|1.8b|tiny` is the older name of a QWen v1 + CLIP pair). Each step is what the Trainer does for one batch: the
frozen tower encodes the images, the projector and LoRA (r=64 on the LLM family's default targets) train, loss
on the supervised positions only, backward, AdamW step. A sample is 10 prompt tokens, the image's placeholders
(256 for CLIP ViT-L/14, 729 for SigLIP so400m) and text: by default 246 text tokens (512 in all with CLIP).
Prints one JSON line: device, versions, configuration, tokens/s, samples/s, MFU (6 FLOPs per LLM parameter
per token against the device's dense bf16 peak), peak memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: the checkout's root on the path instead of bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # whose modules would shadow top-level ones

from bench.requires import require_packages

require_packages("bench/train_step.py")

import argparse
import contextlib
import time

import torch

from bench.harness import (
    PROMPT_TOKENS,
    add_backbone_arguments,
    backbone_pair,
    build_random_vlm,
    check_sample_length,
    count_llm_params,
    device_name,
    emit,
    image_tokens,
    peak_flops,
    peak_memory_gb,
    reset_peak_memory,
    sync,
    synthetic_batch,
    versions,
)
from llm.quantization import NONE, QUANTIZATIONS

TEXT_TOKENS = 246  # text after the image by default: 10 + 256 + 246 = 512 tokens a sample with CLIP ViT-L/14


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_backbone_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample, image tokens included (default: 10 + image tokens + 246: 512 with "
                             "CLIP ViT-L/14, 985 with SigLIP so400m)")
    parser.add_argument("--answer-frac", type=float, default=0.5, help="supervised share of the text tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=NONE,
                        help="nf4: the LLM's linear weights in 4-bit (QLoRA; needs bitsandbytes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        llm, vision = backbone_pair(args.size, args.llm, args.vision)
        seq_len = args.seq_len or PROMPT_TOKENS + image_tokens(vision) + TEXT_TOKENS
        check_sample_length(seq_len, vision, "--seq-len")
    except ValueError as e:
        parser.error(str(e))
    from model import apply_lora  # peft and transformers' models: seconds, after the arguments are checked

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_random_vlm(llm, vision, device, dtype, quantization=args.quantization)
    n_llm = count_llm_params(model)
    peft_model = apply_lora(model, r=args.lora_r, alpha=16, dropout=0.05, verbose=False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    tower = model.vision_tower
    batch = synthetic_batch(model, args.batch_size, seq_len, args.answer_frac, device, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    reset_peak_memory(device)
    for _ in range(args.warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_s = args.batch_size * seq_len / seconds
    peak = peak_flops(device)
    record = {
        "bench": "train_step",
        "device": device_name(device),
        "versions": versions(),
        "config": {"llm": llm, "vision": vision, "batch_size": args.batch_size, "seq_len": seq_len,
                   "image_tokens": tower.num_patches, "answer_frac": args.answer_frac, "lora_r": args.lora_r,
                   "gradient_checkpointing": args.gradient_checkpointing, "dtype": str(dtype).replace("torch.", ""),
                   "quantization": args.quantization,
                   "llm_params": n_llm, "trainable_params": sum(p.numel() for p in trainable)},
        "step_seconds": round(seconds, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "samples_per_s": round(args.batch_size / seconds, 3),
        "mfu": round(6 * n_llm * tokens_per_s / peak, 4) if peak else None,
        "peak_memory_gb": round(peak_memory_gb(device), 2),
        "final_loss": round(loss, 4),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
