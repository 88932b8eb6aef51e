"""The sections of a config file, typed. Every default lives here, once.

    demo:      DemoConfig   only in the demo config: tiny models and synthetic data built by demo.prepare
    model:     ModelConfig  the base models and how images reach the LLM (saved into every checkpoint)
    data:      DataConfig   raw sources -> processed JSON Lines (process_image.py), and the training length
    lora:      LoraConfig   the adapter on the LLM
    training:  any transformers.TrainingArguments field, plus ours (settings.training.TrainArguments)
    align:     the align stage (projector only): the training values it changes, plus `sources`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwen.chat_format import DEFAULT_SYSTEM


@dataclass
class ModelConfig:
    """The models to build on, and how images reach the LLM. Saved into every checkpoint bundle, except
    projector_path (where the projector started: the bundle holds the trained projector itself)."""

    # folder of the LLM as published: Qwen-7B(-Chat) (config.json, *.safetensors, qwen.tiktoken), Qwen2.5 or Qwen3
    # (config.json, *.safetensors, tokenizer.json); its family comes from its config.json model_type (llm/)
    llm_path: str
    # folder of the vision tower as published: openai/clip-vit-large-patch14 or google/siglip-so400m-patch14-384
    # (config.json, weights, preprocessor_config.json); its family from its config.json model_type (visual/)
    vision_path: str
    vision_feature_layer: int = -2  # hidden_states index of the tower layer whose patch features are used
    system_prompt: str = DEFAULT_SYSTEM
    # folder whose projector.safetensors starts the instruct stage (an align run's output, or any bundle or
    # checkpoint of the same shapes); default: the align section's output_dir when the config has one
    projector_path: str | None = None
    quantization: str = field(default="none", metadata={
        "help": "none, or nf4: the LLM's linear weights in 4-bit NF4 (QLoRA; needs bitsandbytes): embeddings, "
                "norms, LM head, projector and LoRA stay unquantised; recorded in every bundle (llm/quantization.py)"})


@dataclass
class DataSource:
    """One raw data set: its format, its annotation file and the folder its image paths are relative to."""

    format: str  # "aic" (AI Challenger captions) or "llava" (LLaVA conversations)
    annotations: str
    image_dir: str
    limit: int | None = None  # keep at most this many rows of this source (the first ones)
    name: str | None = None  # shown in the report; defaults to the annotation file's name


@dataclass
class DataConfig:
    sources: list[DataSource]
    output: str  # processed JSON Lines, written by process_image.py
    val_output: str | None = None  # validation split; default: <output stem>.val.jsonl
    val_size: int = 200  # samples held out for validation (at most 5% of the data)
    seed: int = 1234  # prompt choice for captions and the validation split
    num_workers: int = 4  # image-decoding processes in process_image.py (0: in the main process)
    # optional folder of precomputed CLIP features (docs/COMMANDS.md: The CLIP feature cache)
    feature_cache: str | None = None
    max_length: int = 2048  # tokens per training sample, image placeholders included

    def resolved_val_output(self) -> str:
        if self.val_output:
            return self.val_output
        out = Path(self.output)
        return str(out.with_name(out.stem + ".val" + out.suffix))


@dataclass
class LoraConfig:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # suffixes of module names inside the LLM's layers; None: the LLM family's default (llm/: QWen v1 c_attn, c_proj,
    # w1, w2; Qwen2 / Qwen3 q/k/v/o_proj and gate/up/down_proj)
    lora_target_modules: list[str] | None = None
    train_embeddings: bool = field(
        default=False, metadata={"help": "also train the input embeddings and the LM head (needed when starting "
                                         "from a base model such as Qwen-7B, whose chat tokens were never trained)"}
    )


@dataclass
class DemoConfig:
    """The demo's settings (config.yaml's `demo` section); the defaults are config.yaml's values (tested), so a
    config that leaves a key out gets the demo that README describes."""

    workdir: str = ".demo"
    seed: int = 0
    image_size: int = 112
    n_train_images: int = 1000  # LLaVA-format conversations (6 questions each)
    n_caption_images: int = 100  # AI Challenger-format captions, on other images
    n_heldout_images: int = 120  # for demo_eval.json, on images of neither set
    qwen: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "intermediate_size": 512})
    clip: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                                                "intermediate_size": 256, "patch_size": 14,
                                                "position_embedding_scale": 16.0})
    vocab_size: int = 1024  # BPE ranks of the tiny vocabulary (specials stay at 151643..)
    pretrain_steps: int = 900
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 3e-3
    clip_pretrain_steps: int = 500  # contrastive image-text training of the tiny CLIP before it is frozen (0: none)
    clip_pretrain_batch_size: int = 64  # distinct captions per batch (at most the 72 there are)
    clip_pretrain_learning_rate: float = 2e-3
    clip_pretrain_images_per_caption: int = 48  # pictures drawn for each of the 72 captions
