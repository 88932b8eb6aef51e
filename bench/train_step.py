"""LoRA training-step throughput and memory of the full architecture, on synthetic batches.

    python -m bench.train_step --size 7b --batch-size 8 --seq-len 512                    # GPU, bf16
    python -m bench.train_step --size 7b --batch-size 1 --seq-len 512 --gradient-checkpointing
    python -m bench.train_step --size tiny --device cpu
    python -m bench.train_step --size 7b --batch-size 1 --seq-len 512 --gradient-checkpointing --quantization nf4

Each step is what the Trainer does for one batch: the frozen tower encodes the images, the projector and
LoRA (r=64 on c_attn, c_proj, w1, w2) train, loss on the supervised positions only, backward, AdamW step.
Prints one JSON line: device, versions, configuration, tokens/s, samples/s, MFU (6 FLOPs per LLM parameter
per token against the device's dense bf16 peak), peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.harness import (
    SIZES,
    build_random_vlm,
    count_llm_params,
    device_name,
    emit,
    peak_flops,
    peak_memory_gb,
    reset_peak_memory,
    sync,
    synthetic_batch,
    versions,
)
from llm.quantization import NONE, QUANTIZATIONS
from model import apply_lora


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample, 256 image tokens included")
    parser.add_argument("--answer-frac", type=float, default=0.5, help="supervised share of the text tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=NONE,
                        help="nf4: the LLM's linear weights in 4-bit (QLoRA; needs bitsandbytes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_random_vlm(args.size, device, dtype, quantization=args.quantization)
    n_llm = count_llm_params(model)
    peft_model = apply_lora(model, r=args.lora_r, alpha=16, dropout=0.05, verbose=False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    tower = model.vision_tower
    batch = synthetic_batch(args.batch_size, args.seq_len, tower.num_patches, tower.image_size, args.answer_frac,
                            device, dtype)
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
    tokens_per_s = args.batch_size * args.seq_len / seconds
    peak = peak_flops(device)
    record = {
        "bench": "train_step",
        "device": device_name(device),
        "versions": versions(),
        "config": {"size": args.size, "batch_size": args.batch_size, "seq_len": args.seq_len,
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
