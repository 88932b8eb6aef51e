"""A checkpoint ready to answer: the one loading sequence every script that generates uses (infer.py, the
evaluation, the demo, the web UI), with batched answers and a streamed answer that a stop event ends."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from llm import ChatTokenizer, load_tokenizer
from model import VLMConfig, load_vlm
from model.config import BUNDLE_CONFIG_FILE
from visual import ImagePreprocessor, load_image_preprocessor

from .generation import Prompt, StopOnEvent, Turn, fit_history, generate_answers


@dataclass
class LoadedCheckpoint:
    """The model (LoRA merged, unless its base is 4-bit; eval mode, on `device`), its tokenizer and image
    preprocessor, and the bundle's config (system prompt, image token count)."""

    model: torch.nn.Module
    tokenizer: ChatTokenizer
    processor: ImagePreprocessor
    config: VLMConfig
    folder: Path
    device: torch.device

    def generate(self, prompts: list[Prompt], *, system: str | None = None, **options) -> list[str]:
        """`generate_answers` with this checkpoint's system prompt (unless `system`) and image token count."""
        return generate_answers(
            self.model, self.tokenizer, self.processor, prompts,
            system=self.config.system_prompt if system is None else system,
            num_image_tokens=self.config.vision.num_image_tokens, **options,
        )

    def fit(self, query: str, history: Sequence[Turn], system: str | None = None) -> list[Turn]:
        """`fit_history` with this checkpoint's settings: the newest turns that fit the prompt window."""
        return fit_history(self.tokenizer, query, history, num_image_tokens=self.config.vision.num_image_tokens,
                           system=self.config.system_prompt if system is None else system)

    def stream(self, prompt: Prompt, *, system: str | None = None, stop: threading.Event | None = None,
               **options) -> Iterator[str]:
        """The answer so far, each time the streamer decodes more text; the last value is the complete answer,
        exactly `generate`'s (shorter if `stop` was set). Generation runs in a thread that has ended when this
        returns, raises, or is closed early (closing sets `stop`); its exceptions are re-raised here."""
        stop = stop or threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: list[str] = []
        errors: list[BaseException] = []

        def work():
            try:
                result.extend(self.generate([prompt], system=system, streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]), **options))
            except BaseException as e:  # re-raised in the caller's thread once the stream is closed
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        text, finished = "", False
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
            finished = True
        finally:
            if not finished:
                stop.set()  # closed early: do not keep the model busy for nobody
            thread.join()
        if errors:
            raise errors[0]
        yield result[0]


def find_checkpoint(checkpoint: str | os.PathLike | None, root: str | os.PathLike = "outputs") -> Path:
    """`checkpoint` if it is a bundle folder, else (None) the most recently written bundle under `root`.
    FileNotFoundError with a message a person can act on."""
    if checkpoint is None:
        root = Path(root)
        found = sorted(root.glob(f"**/{BUNDLE_CONFIG_FILE}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"no trained checkpoint found under {root}/ (run `bash train.sh`, or pass --checkpoint DIR)")
        return found[-1].parent
    checkpoint = Path(checkpoint)
    if not (checkpoint / BUNDLE_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no {BUNDLE_CONFIG_FILE}): {checkpoint}")
    return checkpoint


def load_checkpoint(
    folder: str | os.PathLike | None,
    *,
    device: str | torch.device | None = None,
    llm_path: str | None = None,
    vision_path: str | None = None,
    quantization: str | None = None,
) -> LoadedCheckpoint:
    """Load a bundle or merged export (None: the newest under ./outputs) for inference: bf16 on a GPU that has
    it, fp32 elsewhere. `llm_path` / `vision_path` override the base folders the bundle recorded (another
    machine); `quantization` ("none" / "nf4") how the LLM's linear weights are held (default: the bundle's
    `text.quantization`, so a QLoRA bundle answers with the 4-bit base it was trained on; see `load_vlm`)."""
    folder = find_checkpoint(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    recorded_llm, recorded_vision = VLMConfig.load(folder).resolve(folder)
    tokenizer = load_tokenizer(llm_path or recorded_llm)
    model, config = load_vlm(folder, dtype=dtype, llm_path=llm_path, vision_path=vision_path, tokenizer=tokenizer,
                             quantization=quantization)
    model.to(device).eval()
    return LoadedCheckpoint(
        model=model,
        tokenizer=tokenizer,
        processor=load_image_preprocessor(vision_path or recorded_vision),
        config=config,
        folder=folder,
        device=device,
    )
