"""A checkpoint ready to answer: the one loading sequence every script that generates uses (infer.py, the
evaluation, the demo, the web UI)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model import BundleConfig, load_vlm
from model.bundle import BUNDLE_CONFIG_FILE
from qwen import QWenTokenizer
from visual import CLIPImagePreprocessor

from .generation import Prompt, generate_answers


@dataclass
class LoadedCheckpoint:
    """The model (LoRA merged, eval mode, on `device`), its tokenizer and image preprocessor, and the bundle's
    config (system prompt, image token count)."""

    model: torch.nn.Module
    tokenizer: QWenTokenizer
    processor: CLIPImagePreprocessor
    config: BundleConfig
    folder: Path
    device: torch.device

    def generate(self, prompts: list[Prompt], *, system: str | None = None, **options) -> list[str]:
        """`generate_answers` with this checkpoint's system prompt (unless `system`) and image token count."""
        return generate_answers(
            self.model, self.tokenizer, self.processor, prompts,
            system=self.config.system_prompt if system is None else system,
            num_image_tokens=self.config.num_image_tokens, **options,
        )


def latest_checkpoint(root: str | os.PathLike = "outputs") -> Path:
    """The most recently written bundle under `root` (FileNotFoundError when there is none)."""
    root = Path(root)
    found = sorted(root.glob(f"**/{BUNDLE_CONFIG_FILE}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no trained checkpoint found under {root}/ (run `bash train.sh`, or pass --checkpoint DIR)")
    return found[-1].parent


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    llm_path: str | None = None,
    vision_path: str | None = None,
) -> LoadedCheckpoint:
    """Load a bundle or merged export for inference: bf16 on a GPU that has it, fp32 elsewhere. `llm_path` /
    `vision_path` override the base folders the bundle recorded (another machine)."""
    folder = Path(folder)
    if not (folder / BUNDLE_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no {BUNDLE_CONFIG_FILE}): {folder}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, config = load_vlm(folder, dtype=dtype, llm_path=llm_path, vision_path=vision_path)
    model.to(device).eval()
    recorded_llm, recorded_vision = config.resolve(folder)
    return LoadedCheckpoint(
        model=model,
        tokenizer=QWenTokenizer.from_pretrained(llm_path or recorded_llm),
        processor=CLIPImagePreprocessor.from_pretrained(vision_path or recorded_vision),
        config=config,
        folder=folder,
        device=device,
    )
