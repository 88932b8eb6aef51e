"""What the benchmarks share: named backbones built with random weights (no checkpoint, no download), the device,
library versions, peak FLOP/s, and printing one JSON line.

A benchmark model is a pair: a language backbone (`LLMS`) and a vision tower (`VISIONS`), each the real
architecture written out from its published config.json, or a tiny one of the same family that runs anywhere
in seconds. `SIZE_PAIRS` keeps the older `--size` names (7b, 1.8b, tiny: QWen v1 + CLIP). The model is built
as `model.build.build_vlm` builds it from folders, minus the loading: the family's causal LM, the family's
tower at `vision_feature_layer` -2, a fresh fp32 projector, and the placeholder id of the family's own
tokenizer. MFU counts 6 FLOPs per LLM parameter per token (forward 2, backward 4) against the device's dense
bf16 peak: MFU = 6 * N_llm * tokens_per_second / peak, with N_llm every parameter of the causal LM counted
once (tied input and output embeddings once).
"""

from __future__ import annotations

import json
import platform
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llm import TextFamily, family_named
from llm.quantization import NONE
from llm.tiny import tiny_qwen2_config, write_qwen2_tokenizer_files

if TYPE_CHECKING:
    from model import VisionLanguageModel

# peft, transformers' models and the project's model load where a benchmark builds one, so that each command's
# --help (and its argument checks) come before those seconds of imports.

FEATURE_LAYER = -2  # build_vlm's default: the penultimate layer (LLaVA's choice, for CLIP and SigLIP alike)


@dataclass(frozen=True)
class LLMSpec:
    """A language backbone: its family (llm.FAMILIES), the fields of its config.json that make the architecture,
    and, for Qwen2 / Qwen3, which published tokenizer its placeholder id comes from ("qwen2.5" or "qwen3")."""

    family: str
    config: dict[str, Any]
    tokenizer: str | None = None


@dataclass(frozen=True)
class VisionSpec:
    """A vision tower: its family (visual.towers.TOWERS) and the fields of its vision config."""

    family: str
    config: dict[str, Any]


# The Qwen2 / Qwen3 fields every published Qwen2.5 / Qwen3 config.json shares here.
_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
          "max_position_embeddings": 32768, "use_sliding_window": False}
_QWEN3 = {"model_type": "qwen3", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
          "max_position_embeddings": 40960, "attention_bias": False}
_QWEN_V1_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "kv_channels": 128,
               "intermediate_size": 22016, "seq_length": 8192}  # QWen's intermediate_size is 2 x the MLP width
_CLIP_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
             "image_size": 224, "patch_size": 14}

LLMS: dict[str, LLMSpec] = {
    # Qwen/Qwen-7B-Chat config.json (vocab 151936, untied, rotary base 10000: QWenConfig's defaults)
    "qwen-7b": LLMSpec("qwen", _QWEN_V1_7B),
    # Qwen/Qwen-1_8B-Chat config.json: the same family at 1.8B, for cards that cannot hold 7B
    "qwen-1.8b": LLMSpec("qwen", {**_QWEN_V1_7B, "hidden_size": 2048, "num_hidden_layers": 24,
                                  "num_attention_heads": 16, "intermediate_size": 11008}),
    # Qwen/Qwen2.5-7B-Instruct config.json
    "qwen2.5-7b": LLMSpec("qwen2", {**_QWEN2, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                                    "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                                    "tie_word_embeddings": False}, "qwen2.5"),
    # Qwen/Qwen2.5-3B-Instruct config.json
    "qwen2.5-3b": LLMSpec("qwen2", {**_QWEN2, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                                    "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                                    "tie_word_embeddings": True}, "qwen2.5"),
    # Qwen/Qwen2.5-1.5B-Instruct config.json
    "qwen2.5-1.5b": LLMSpec("qwen2", {**_QWEN2, "hidden_size": 1536, "num_hidden_layers": 28,
                                      "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
                                      "vocab_size": 151936, "tie_word_embeddings": True}, "qwen2.5"),
    # Qwen/Qwen3-8B config.json (head_dim is its own field: 32 x 128 = hidden 4096 here)
    "qwen3-8b": LLMSpec("qwen2", {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
                                  "vocab_size": 151936, "tie_word_embeddings": False}, "qwen3"),
    # Tiny ones, full vocabularies: QWen v1 (2 layers, hidden 64, 2 heads of 32 channels: the smallest head that
    # vLLM's CPU attention runs, for bench/vllm_generate.py); Qwen2.5 and Qwen3 at llm/tiny.py's tiny sizes in the
    # Qwen2.5-7B-Instruct and Qwen3-8B layouts (the sizes the tests' tiny folders have).
    "tiny-qwen": LLMSpec("qwen", {**_QWEN_V1_7B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "kv_channels": 32, "intermediate_size": 256}),
    "tiny-qwen2.5": LLMSpec("qwen2", tiny_qwen2_config("Qwen/Qwen2.5-7B-Instruct"), "qwen2.5"),
    "tiny-qwen3": LLMSpec("qwen2", tiny_qwen2_config("Qwen/Qwen3-8B"), "qwen3"),
}

VISIONS: dict[str, VisionSpec] = {
    # openai/clip-vit-large-patch14 config.json, vision_config (quick_gelu, eps 1e-5: CLIPVisionConfig's defaults):
    # 256 patch features (CLS dropped)
    "clip-vit-l14": VisionSpec("clip", _CLIP_L14),
    # google/siglip-so400m-patch14-384 config.json, vision_config (gelu_pytorch_tanh, eps 1e-6: SiglipVisionConfig's
    # defaults): 384 // 14 = 27, so 27 x 27 = 729 patch features (no CLS)
    "siglip-so400m": VisionSpec("siglip", {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                                           "intermediate_size": 4304, "image_size": 384, "patch_size": 14}),
    # Tiny towers (2 layers, hidden 64) at the real image and patch sizes, so the same 256 / 729 image tokens
    "tiny-clip": VisionSpec("clip", {**_CLIP_L14, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 256}),
    "tiny-siglip": VisionSpec("siglip", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 256, "image_size": 384, "patch_size": 14}),
}

# The older `--size` names: QWen v1 + CLIP pairs.
SIZE_PAIRS = {"7b": ("qwen-7b", "clip-vit-l14"), "1.8b": ("qwen-1.8b", "clip-vit-l14"),
              "tiny": ("tiny-qwen", "tiny-clip")}
# The same pairs as QWenConfig / CLIPVisionConfig fields (bench.vllm_generate writes its folders from them).
SIZES = {size: {"qwen": LLMS[llm].config, "clip": VISIONS[vision].config} for size, (llm, vision) in SIZE_PAIRS.items()}

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
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def image_placeholder(spec: LLMSpec) -> tuple[str, int]:
    """The family tokenizer's image placeholder (text, id), as build_vlm takes it from the LLM folder's tokenizer:
    QWen v1 `<|extra_0|>` 151646; Qwen2.5 / Qwen3 `<|image_pad|>` 151655, read from a tokenizer written in the
    published layout (llm/tiny.py keeps every added token at its published id)."""
    if spec.tokenizer is None:
        from qwen import IMAGE_TAG, IMAGE_TOKEN_ID

        return IMAGE_TAG, IMAGE_TOKEN_ID
    with tempfile.TemporaryDirectory() as folder:
        write_qwen2_tokenizer_files(folder, spec.tokenizer)
        tokenizer = family_named(spec.family).load_tokenizer(folder)
    return tokenizer.image_token, tokenizer.image_token_id


def _language_model(family: TextFamily, spec: LLMSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The family's causal LM of the spec's architecture with random weights, in the current device context."""
    if family.name == "qwen":
        from qwen import QWenConfig, QWenLMHeadModel

        return QWenLMHeadModel(QWenConfig(**spec.config))
    import transformers

    config = transformers.AutoConfig.for_model(**spec.config)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _tower_class(name: str):
    from visual.towers import TOWERS

    for tower in TOWERS:
        if tower.family == name:
            return tower
    raise ValueError(f"unknown vision tower family {name!r} (known: {', '.join(t.family for t in TOWERS)})")


def build_random_vlm(llm: str, vision: str, device: torch.device, dtype: torch.dtype,
                     quantization: str = NONE) -> VisionLanguageModel:
    """A VisionLanguageModel of the named backbones (`LLMS`, `VISIONS`) with random weights, built directly on
    `device` in `dtype` (the projector fp32, as in training), `text_family` and `image_token` set as build_vlm
    sets them. With `quantization` "nf4", the LLM is written to a temporary folder and loaded back the way a real
    checkpoint loads in 4-bit (`TextFamily.load_model`), onto the current GPU (or the CPU)."""
    from model import VisionLanguageModel

    llm_spec, vision_spec = LLMS[llm], VISIONS[vision]
    family = family_named(llm_spec.family)
    tower_class = _tower_class(vision_spec.family)
    image_token, image_token_id = image_placeholder(llm_spec)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tower = tower_class(tower_class.config_class(**vision_spec.config), feature_layer=FEATURE_LAYER)
            model = VisionLanguageModel(_language_model(family, llm_spec, dtype), tower, image_token_id=image_token_id)
    finally:
        torch.set_default_dtype(previous)
    model.text_family, model.image_token = family, image_token
    with torch.no_grad():  # the tower is built without an init (it expects a checkpoint): give it one
        for name, p in tower.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.vision_tower.to(device, dtype)
    model.projector.float()
    if quantization != NONE:
        with tempfile.TemporaryDirectory() as folder:
            model.language_model.save_pretrained(folder, max_shard_size="2GB")  # safetensors, the published layout
            model.language_model = None  # its full-precision weights are freed before the 4-bit ones load
            model.language_model = model.text_family.load_model(folder, dtype=dtype, quantization=quantization)
    return model


def backbone_pair(size: str | None, llm: str | None, vision: str | None) -> tuple[str, str]:
    """The (llm, vision) names a bench command runs: `--size`'s pair, or `--llm` / `--vision` (defaults: the
    verified Qwen-7B + CLIP ViT-L/14). ValueError when `--size` is given with either."""
    if size is not None:
        if llm is not None or vision is not None:
            raise ValueError("give either --size or --llm/--vision, not both")
        return SIZE_PAIRS[size]
    return llm or "qwen-7b", vision or "clip-vit-l14"


def add_backbone_arguments(parser) -> None:
    """--llm, --vision and the older --size, as every model benchmark takes them."""
    parser.add_argument("--llm", choices=list(LLMS), default=None,
                        help="language backbone, random weights in its published architecture (default qwen-7b)")
    parser.add_argument("--vision", choices=list(VISIONS), default=None,
                        help="vision tower, random weights in its published architecture (default clip-vit-l14)")
    parser.add_argument("--size", choices=list(SIZE_PAIRS), default=None,
                        help="older shorthand for a QWen v1 + CLIP pair: " +
                             ", ".join(f"{s} = --llm {a} --vision {b}" for s, (a, b) in SIZE_PAIRS.items()))


def count_llm_params(model) -> int:
    """Parameters of the causal LM, each once (tied embeddings once; no LoRA, tower or projector weight; a 4-bit
    weight counts the values it holds, not its packed bytes)."""
    return sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()
               for n, p in model.named_parameters()
               if "vision_tower" not in n and "projector" not in n and "lora_" not in n)


PROMPT_TOKENS = 10  # text before the image in every synthetic sample


def image_tokens(vision: str) -> int:
    """Placeholder tokens one image takes with the named tower (256 for clip-vit-l14, 729 for siglip-so400m)."""
    spec = VISIONS[vision]
    tower_class = _tower_class(spec.family)
    return tower_class.num_image_tokens(tower_class.config_class(**spec.config))


def check_sample_length(length: int, vision: str, flag: str) -> None:
    """ValueError naming `flag` unless a sample of `length` tokens has text after the prompt and the image."""
    shortest = PROMPT_TOKENS + image_tokens(vision) + 1
    if length < shortest:
        raise ValueError(f"{flag} {length} leaves no text after {PROMPT_TOKENS} prompt tokens and the "
                         f"{image_tokens(vision)} image tokens of {vision}: give at least {shortest}")


def synthetic_batch(model: VisionLanguageModel, batch: int, seq_len: int, answer_frac: float, device: torch.device,
                    dtype: torch.dtype, vocab: int = 151643, seed: int = 0) -> dict:
    """One image per sample: [10 prompt tokens][the image's placeholders][text ...], the last `answer_frac` of the
    text supervised; ids drawn from the ordinary tokens, the placeholder being the model's image token."""
    n_image_tokens, image_size = model.vision_tower.num_patches, model.vision_tower.image_size
    if seq_len <= PROMPT_TOKENS + n_image_tokens:
        raise ValueError(f"{seq_len} tokens per sample leave no text after the prompt and the image")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ids[:, PROMPT_TOKENS:PROMPT_TOKENS + n_image_tokens] = model.image_token_id
    labels = ids.clone()
    first_answer = seq_len - int((seq_len - PROMPT_TOKENS - n_image_tokens) * answer_frac)
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
