"""Answering prompts with images: the one generation path used by infer.py, webui.py, the evaluation and the demo.

Prompts are built exactly as in training (`dataset.conversation.build_prompt_ids`: ChatML, user text encoded
as text, each `<image>` marker expanded to the image's N placeholder ids of the LLM's image token), batched with
left padding and an attention mask from the true lengths, and decoded greedily or by sampling until
`<|im_end|>`. Generation may only produce the ids an answer may hold (`tokenizer.answer_token_ids()`: no image
placeholders or other special tokens, no padding rows of the embedding matrix).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from dataprocess.schema import IMAGE_MARKER
from dataset.conversation import build_prompt_ids
from dataset.dataset import DataCollator
from qwen.chat_format import DEFAULT_MAX_WINDOW_SIZE
from qwen.tokenization_qwen import to_id_list


class PromptError(ValueError):
    """A prompt that does not fit its images (a count mismatch, a typed image tag); the message says which."""


def query_with_images(text: str, n_images: int) -> str:
    """The user text of a typed prompt with one `<image>` marker per image: where the prompt has them, or all in
    front (one per line, the layout of training) when it has none."""
    marks = text.count(IMAGE_MARKER)
    if marks == 0:
        return "".join(f"{IMAGE_MARKER}\n" for _ in range(n_images)) + text
    if marks != n_images:
        raise PromptError(f"the prompt has {marks} {IMAGE_MARKER} mark(s) but {n_images} image(s) were given")
    return text


class AllowedTokens(LogitsProcessor):
    """Sets the score of every id outside `allowed` (a bool mask over the vocabulary) to -inf, in place: `generate`
    hands each step's processors a float32 copy of the logits, and allocating a fresh [batch, 151936] tensor each
    step was two thirds of this processor's time on CPU."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed
        self._disallowed: dict = {}  # (device, width) -> ~allowed[:width] there, made once

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        key = (scores.device, scores.shape[-1])
        if key not in self._disallowed:
            self._disallowed[key] = ~self.allowed[: scores.shape[-1]].to(scores.device)
        return scores.masked_fill_(self._disallowed[key], float("-inf"))


def allowed_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ordinary BPE tokens plus the three ChatML stop tokens (`tokenizer.answer_token_ids()`); nothing else."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[tokenizer.answer_token_ids()] = True
    return allowed


def decode_response(tokenizer, generated_ids) -> str:
    """Text of an answer from the ids generated after the prompt: up to the first stop id, stripped."""
    ids = to_id_list(generated_ids)
    stops = set(tokenizer.stop_token_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end]).strip()


@dataclass
class Prompt:
    query: str  # user text; each image is one `<image>` marker (query_with_images adds them in front)
    images: list  # PIL images, one per tag, in order
    history: list[tuple[str, str]] | None = None


@dataclass
class Turn:
    """One finished exchange of a conversation: the query (image markers in place), its images in marker order,
    the answer."""

    query: str
    images: list = field(default_factory=list)
    answer: str = ""


def chat_prompt(query: str, images: Sequence, history: Sequence[Turn] = ()) -> Prompt:
    """The Prompt that asks `query` (with its `images`) after `history`: every image in the order of its marker."""
    return Prompt(
        query,
        [image for turn in history for image in turn.images] + list(images),
        [(turn.query, turn.answer) for turn in history],
    )


def fit_history(tokenizer, query: str, history: Sequence[Turn], *, system: str, num_image_tokens: int,
                max_window_size: int = DEFAULT_MAX_WINDOW_SIZE) -> list[Turn]:
    """The newest turns of `history` whose prompt (with `query`) stays within max_window_size tokens.
    Whole turns are dropped with their images; the query itself is always kept."""
    kept = list(history)
    while kept:
        pairs = [(turn.query, turn.answer) for turn in kept]
        if len(build_prompt_ids(tokenizer, query, pairs, system, num_image_tokens)) <= max_window_size:
            break
        kept.pop(0)
    return kept


class StopOnEvent(StoppingCriteria):
    """Ends generation (every row) at the next token once `event` is set (a stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def prompt_tensors(prompts: list[Prompt], tokenizer, processor, system: str, num_image_tokens: int):
    """Left-padded input_ids, attention_mask (from lengths) and the concatenated pixel_values of a batch."""
    items = []
    for p in prompts:
        n_marks = p.query.count(IMAGE_MARKER) + sum(q.count(IMAGE_MARKER) for q, _ in p.history or [])
        if n_marks != len(p.images):
            raise PromptError(f"the prompt has {n_marks} {IMAGE_MARKER} mark(s) but {len(p.images)} image(s) were "
                              "given")
        items.append({
            "input_ids": build_prompt_ids(tokenizer, p.query, p.history or [], system, num_image_tokens),
            "pixel_values": processor(p.images) if p.images else None,
        })
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left")(items)
    return batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    processor,
    prompts: list[Prompt],
    *,
    system: str,
    num_image_tokens: int,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 0.8,
    repetition_penalty: float = 1.0,
    streamer=None,
    stopping_criteria=None,
    pixel_override=None,
) -> list[str]:
    """Answers for a batch of prompts (greedy when temperature is 0). `pixel_override(pixels)` lets the demo
    evaluation blank the images after preprocessing; `stopping_criteria` (a stop button's) end it early.

    No repetition penalty unless asked (`repetition_penalty` other than 1.0): the 1.1 of Qwen-7B-Chat's
    generation_config.json is not applied, as every setting is passed to `generate` explicitly (in transformers
    5 even an explicit None overrides the checkpoint's value, and means no penalty). The `--format llava`
    export's generation_config.json says the same (model/export_llava.py)."""
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails the first test
        raise ValueError(f"temperature {temperature}: must be 0 (greedy) or a positive number")
    input_ids, attention_mask, pixel_values = prompt_tensors(prompts, tokenizer, processor, system, num_image_tokens)
    device = next(model.parameters()).device
    if pixel_values is not None:
        if pixel_override is not None:
            pixel_values = pixel_override(pixel_values)
        pixel_values = pixel_values.to(device, model.vision_tower.dtype)
    stops = tokenizer.stop_token_ids
    sampling = temperature > 0
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        repetition_penalty=repetition_penalty,  # see the docstring: 1.0 (none) unless asked
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([AllowedTokens(allowed_token_mask(tokenizer, model.config.vocab_size))]),
        streamer=streamer,
        stopping_criteria=stopping_criteria,
    )
    return [decode_response(tokenizer, row) for row in out[:, input_ids.shape[1]:].tolist()]
