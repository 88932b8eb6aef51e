"""How far a QLoRA bundle's merged export is from the 4-bit model it was trained as, on the CPU demo's held-out
questions. Prints one JSON line.

    QUANTIZATION=nf4 bash train.sh
    python -m model.export --checkpoint outputs/demo --output exported/demo-merged
    python -m bench.qlora_merge --checkpoint outputs/demo --merged exported/demo-merged

The bundle loads as infer.py loads it (the base in 4-bit NF4, the adapter beside it, unmerged); the export is the
adapter folded into the original weights. Both answer every held-out question with its image, greedily (at most
12 new tokens, as demo.evaluate): `same_answers` is the share of identical answers, `accuracy` each one's
(demo.synthetic.normalise_answer). `logits`: both models' next-token logits over the ids an answer may hold
(`tokenizer.answer_token_ids()`, what generation chooses from) at every position of every prompt, the largest and
the mean |difference| (`all_positions`) and the same at the last position, whose argmax is the answer's first
token (`last_position`); `logit_std` is the spread of the 4-bit model's logits there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.harness import device_name, emit, versions


def prompt_logits(loaded, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, answer ids], attention mask [B, T]) of a batch of prompts, left-padded as in generation."""
    from inference.generation import prompt_tensors

    ids, mask, pixels = prompt_tensors(prompts, loaded.tokenizer, loaded.processor, loaded.config.system_prompt,
                                       loaded.config.vision.num_image_tokens)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    return logits[..., loaded.tokenizer.answer_token_ids()].float(), mask.bool()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", default="outputs/demo", help="the QLoRA bundle (default: outputs/demo)")
    parser.add_argument("--merged", required=True, help="its `python -m model.export` folder")
    parser.add_argument("--heldout", default=".demo/raw/heldout.json", help="the demo's held-out questions")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from demo.evaluate import heldout_samples
    from demo.synthetic import normalise_answer
    from inference import Prompt, load_checkpoint
    from visual import load_image

    samples = [s for s in heldout_samples(Path(args.heldout)) if s.info["wording"] == "trained"]
    four_bit = load_checkpoint(args.checkpoint, device="cpu")
    merged = load_checkpoint(args.merged, device="cpu")
    answers = {"4bit": [], "merged": []}
    largest, total, count, last_largest, last_total, last_logits = 0.0, 0.0, 0, 0.0, 0.0, []
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start:start + args.batch_size]
        prompts = [Prompt(s.prompt, [load_image(p) for p in s.images]) for s in chunk]
        for name, loaded in (("4bit", four_bit), ("merged", merged)):
            answers[name] += loaded.generate(prompts, max_new_tokens=12, repetition_penalty=1.0)
        (a, mask), (b, _) = prompt_logits(four_bit, prompts), prompt_logits(merged, prompts)
        difference = (a - b).abs()[mask]  # [real positions, vocab]
        largest, total, count = max(largest, difference.max().item()), total + difference.sum().item(), \
            count + difference.numel()
        last = (a[:, -1] - b[:, -1]).abs()  # left padding: the last position is every prompt's own
        last_largest, last_total = max(last_largest, last.max().item()), last_total + last.sum().item()
        last_logits.append(a[:, -1])

    def accuracy(name: str) -> float:
        right = [normalise_answer(p, s.language) == normalise_answer(s.answer, s.language)
                 for p, s in zip(answers[name], samples)]
        return round(sum(right) / len(right), 4)

    vocab = last_logits[0].shape[-1]
    record = {
        "bench": "qlora_merge",
        "device": device_name(torch.device("cpu")),
        "versions": versions(),
        "checkpoint": args.checkpoint,
        "quantization": four_bit.config.text.quantization,
        "merged": args.merged,
        "n": len(samples),
        "same_answers": round(sum(x == y for x, y in zip(answers["4bit"], answers["merged"])) / len(samples), 4),
        "accuracy": {"4bit": accuracy("4bit"), "merged": accuracy("merged")},
        "logits": {"all_positions": {"max_abs_diff": round(largest, 4), "mean_abs_diff": round(total / count, 5)},
                   "last_position": {"max_abs_diff": round(last_largest, 4),
                                     "mean_abs_diff": round(last_total / (len(samples) * vocab), 5)},
                   "logit_std": round(torch.cat(last_logits).std().item(), 3)},
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
