"""What the benchmarks share: named model sizes built with random weights (no checkpoint needed), the device,
library versions, peak FLOP/s, and printing one JSON line.

Sizes: `7b` is the real architecture (Qwen-7B's config.json + CLIP ViT-L/14 at 224 px: 256 image tokens +
the projector); `1.8b` a smaller QWen of the same shape family for cards that cannot hold 7B; `tiny` runs
anywhere in seconds. MFU counts 6 FLOPs per LLM parameter per token (forward 2, backward 4) against the
device's dense bf16 peak: MFU = 6 * N_llm * tokens_per_second / peak.
"""

from __future__ import annotations

import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from transformers import CLIPVisionConfig

from llm import family_named
from llm.quantization import NONE
from model import VisionLanguageModel
from qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenConfig, QWenLMHeadModel
from qwen.checkpoint import save_sharded_safetensors
from visual import CLIPVisionTower

SIZES = {
    "7b": {
        "qwen": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
                 "intermediate_size": 22016, "seq_length": 8192},
        "clip": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                 "image_size": 224, "patch_size": 14},
    },
    "1.8b": {
        "qwen": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "kv_channels": 128,
                 "intermediate_size": 11008, "seq_length": 8192},
        "clip": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                 "image_size": 224, "patch_size": 14},
    },
    "tiny": {
        "qwen": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
                 "intermediate_size": 256, "seq_length": 8192},
        "clip": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                 "image_size": 224, "patch_size": 14},
    },
}

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), matched on the device name.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor()} x{torch.get_num_threads()} threads"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def build_random_vlm(size: str, device: torch.device, dtype: torch.dtype, quantization: str = NONE):
    """A VisionLanguageModel (QWen + CLIP) of the named size with random weights, built directly on `device` in
    `dtype`; with `quantization` "nf4", the QWen is written to a temporary folder and loaded back the way a real
    checkpoint loads in 4-bit (`TextFamily.load_model`), onto the current GPU (or the CPU)."""
    spec = SIZES[size]
    vision_config = CLIPVisionConfig(**spec["clip"])
    config = QWenConfig(**spec["qwen"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tower = CLIPVisionTower(vision_config, feature_layer=-2)
            model = VisionLanguageModel(QWenLMHeadModel(config), tower, image_token_id=IMAGE_TOKEN_ID)
    finally:
        torch.set_default_dtype(previous)
    model.text_family, model.image_token = family_named("qwen"), IMAGE_TAG
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.vision_tower.to(device, dtype)
    model.projector.float()
    if quantization != NONE:
        with tempfile.TemporaryDirectory() as folder:
            model.language_model.config.save_pretrained(folder)
            save_sharded_safetensors(model.language_model.state_dict(), Path(folder), max_shard_bytes=2**31)
            model.language_model = None  # its full-precision weights are freed before the 4-bit ones load
            model.language_model = model.text_family.load_model(folder, dtype=dtype, quantization=quantization)
    return model


def count_llm_params(model) -> int:
    """Parameters of the LLM (a 4-bit weight counts the values it holds, not its packed bytes)."""
    return sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()
               for n, p in model.named_parameters()
               if "vision_tower" not in n and "projector" not in n and "lora_" not in n)


def synthetic_batch(batch: int, seq_len: int, n_image_tokens: int, image_size: int, answer_frac: float,
                    device: torch.device, dtype: torch.dtype, vocab: int = 151643, seed: int = 0) -> dict:
    """One image per sample: [10 prompt tokens][n_image_tokens placeholders][text ...], the last
    `answer_frac` of the text supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ids[:, 10:10 + n_image_tokens] = IMAGE_TOKEN_ID
    labels = ids.clone()
    first_answer = seq_len - int((seq_len - 10 - n_image_tokens) * answer_frac)
    labels[:, :first_answer] = -100
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(record: dict) -> None:
    record = {"date": time.strftime("%Y-%m-%d"), **record}
    print(json.dumps(record, ensure_ascii=False), flush=True)
