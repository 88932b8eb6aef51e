"""What the `--format llava` tests share, whatever the pair of backbones: a bundle with visible trained values, its
export, our model and stock transformers' loaded from it, and the checks that the two agree (logits, greedy tokens,
answers, prompt ids, pixels, the chat template's refusals). tests/model/test_export_llava.py runs them on QWen v1 +
CLIP, tests/model/test_export_llava_backbones.py on Qwen2.5 / Qwen3 with CLIP or SigLIP."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from dataset.conversation import build_prompt_ids, encode_conversation
from inference import Prompt, generate_answers, query_with_images
from inference.generation import allowed_token_mask, prompt_tensors
from llm import load_tokenizer
from llm.qwen2_tokenizer import Qwen2Tokenizer
from llm.tiny import (
    published_layout,
    random_qwen2_state_dict,
    tiny_qwen2_config,
    write_qwen2_tokenizer_files,
    write_tiny_qwen2_checkpoint,
)
from model import apply_lora, build_vlm, load_vlm, save_bundle, vlm_config_for
from model.export import main as export_main
from visual import load_image_preprocessor

SYSTEM = 'You are a "test" assistant.\nAnswer briefly; 简短回答 🙂'


def make_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    if mode == "P":  # a palette image
        return make_image(seed, width, height).convert("P")
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


IMAGES = [make_image(0, 80, 60), make_image(1, 50, 90), make_image(2, 56, 56), make_image(3, 120, 70)]


# --------------------------------------------------------------------------------------------------
# Building, exporting, loading
# --------------------------------------------------------------------------------------------------


def never_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] mask of every id no answer holds (what infer.py masks)."""
    return ~allowed_token_mask(tokenizer, vocab_size)


def unlisted_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] mask of the ids no answer holds below the tokenizer's first special token: the ids a tokenizer
    smaller than the embedding has no token for (150,619 with the tiny test vocabularies), which the export's
    `suppress_tokens` does not list (model.export_llava.suppressed_token_ids)."""
    never = never_ids(tokenizer, vocab_size)
    never[min(tokenizer.special_ids):] = False
    return never


def quiet_rows(head: torch.Tensor, ids: torch.Tensor) -> None:
    """Zero the output-head rows of `ids` (a mask), as in a trained model, where ids no answer holds never score
    first: 0 is below the best of the ~1,000 random scores of the tiny vocabulary's tokens. With `unlisted_ids`, the
    export's transformers side answers like infer.py (without, an untrained tiny model ranks one of the 150,619 ids
    the short `suppress_tokens` leaves out first at nearly every step); with `never_ids`, an engine that applies no
    `suppress_tokens` at all (vLLM) does too."""
    with torch.no_grad():
        head[ids] = 0.0


def make_bundle(folder: Path, llm_dir: Path, vision_dir: Path, *, train_embeddings: bool) -> Path:
    """A bundle whose every trained tensor has a visible value: LoRA on all default targets, the projector, and,
    with `train_embeddings`, full copies of the embeddings and the LM head (its `unlisted_ids` rows quiet; without
    `train_embeddings` the head is the LLM folder's, whose rows should be quiet already:
    `write_quiet_qwen2_checkpoint`)."""
    model = build_vlm(llm_dir, vision_dir)
    peft_model = apply_lora(model, r=4, alpha=8, train_embeddings=train_embeddings, verbose=False)
    tokenizer = load_tokenizer(llm_dir)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2 if "lora_" in name or "projector" in name else 0.05)
            if "lm_head" in name:
                quiet_rows(p, unlisted_ids(tokenizer, p.shape[0]))
    save_bundle(peft_model.eval(), folder, vlm_config_for(model, llm_dir, vision_dir, SYSTEM))
    return folder


def write_quiet_qwen2_checkpoint(path: Path, repo: str, *, seed: int, quiet=unlisted_ids, **config_fields) -> Path:
    """`llm.tiny.write_tiny_qwen2_checkpoint(path, repo, seed=seed, **config_fields)` with the `quiet(tokenizer,
    vocab_size)` rows of its output head at 0 (`quiet_rows`; the embeddings when tied: those ids are never an input
    either), for a bundle that does not train the head."""
    config = tiny_qwen2_config(repo, **config_fields)
    state = random_qwen2_state_dict(config, seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        write_qwen2_tokenizer_files(scratch, published_layout(repo).family)
        tokenizer = Qwen2Tokenizer.from_pretrained(scratch)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    quiet_rows(head, quiet(tokenizer, head.shape[0]))
    return write_tiny_qwen2_checkpoint(path, repo, state_dict=state, **config_fields)


def export_llava(bundle: Path, output: Path) -> Path:
    """`python -m model.export --format llava` in fp32, in shards of at most about 10 MB."""
    code = export_main(["--checkpoint", str(bundle), "--output", str(output), "--format", "llava", "--dtype", "fp32",
                        "--max-shard-gb", "0.01"])
    assert code == 0
    return output


class Ours(NamedTuple):
    """What infer.py loads from a bundle: the model (LoRA merged), its description, tokenizer and preprocessor."""

    model: Any
    config: Any
    tokenizer: Any
    preprocessor: Any


def load_ours(bundle: Path) -> Ours:
    model, config = load_vlm(bundle)
    llm_path, vision_path = config.resolve(bundle)
    return Ours(model.eval(), config, load_tokenizer(llm_path), load_image_preprocessor(vision_path))


def load_hf_model(exported: Path):
    model, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mis-shaped tensor
    return model.eval()


def load_processor(exported: Path):
    """The PIL implementation of the image processor (transformers' choice where torchvision is absent)."""
    return AutoProcessor.from_pretrained(exported, backend="pil")


def safetensors_names(folder: Path) -> set[str]:
    """Every tensor name of a folder's weights (single file or shards with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# --------------------------------------------------------------------------------------------------
# The model: logits and greedy tokens
# --------------------------------------------------------------------------------------------------


BATCHES = {
    "one_image": [Prompt("<image>\nWhat colour is the shape?", IMAGES[:1])],
    "two_images_one_prompt": [Prompt("Compare <image> with <image>: which is brighter?", IMAGES[1:3])],
    "left_padded_batch": [
        Prompt("<image>\n图形在图片的哪个角？", IMAGES[3:4]),
        Prompt("<image>\n<image>\nDescribe both pictures in one long sentence, please.", IMAGES[:2]),
        Prompt("A question without an image.", []),
    ],
}


def our_batch(ours: Ours, prompts: list[Prompt]):
    return prompt_tensors(prompts, ours.tokenizer, ours.preprocessor, ours.config.system_prompt,
                          ours.config.vision.num_image_tokens)


def check_logits(ours: Ours, hf_model, prompts: list[Prompt], atol: float) -> None:
    """Our forward and transformers' give the same logits at every real (not padding) position."""
    ids, mask, pixels = our_batch(ours, prompts)
    n_images = 0 if pixels is None else len(pixels)
    assert (ids == ours.tokenizer.image_token_id).sum() == ours.config.vision.num_image_tokens * n_images
    with torch.no_grad():
        expected = ours.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = hf_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert got.shape == expected.shape
    real = mask.bool()  # padding positions attend to nothing real; their logits mean nothing in either model
    # per position, the largest logit and the largest difference ([B, T]: the [B, T, vocab] tensors are large)
    largest = expected.abs().amax(-1)[real]
    difference = (got - expected).abs_().amax(-1)[real]
    assert largest.min() > 0.1  # logits with something in them at every position
    assert difference.max() <= atol, f"logits differ by up to {difference.max():.3g} (tolerance {atol})"


def check_greedy_tokens(ours: Ours, hf_model) -> None:
    """The same plain greedy search (no penalty, no suppressed ids, no stop: all 10 tokens compared) gives the same
    tokens for a left-padded batch with images."""
    ids, mask, pixels = our_batch(ours, BATCHES["left_padded_batch"])
    tokenizer = ours.tokenizer
    plain = GenerationConfig(do_sample=False, max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.0,
                             suppress_tokens=[], eos_token_id=[tokenizer.im_end_id],
                             pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = ours.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=plain)
        got = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=plain)
    assert got.shape == (3, ids.shape[1] + 10)
    assert got.tolist() == expected.tolist()
    assert len(set(got[:, ids.shape[1]:].flatten().tolist())) > 3  # not one token repeated


def check_stock_pipeline_answers(ours: Ours, hf_model, processor, max_new_tokens: int = 8) -> None:
    """processor + chat template + generate() with the exported generation_config == our generation's answers
    (`inference.generate_answers`, what infer.py runs), for a left-padded batch of two conversations."""
    prompts = [("What colour is the shape?", IMAGES[:1]), ("<image> or <image>: which one is darker?", IMAGES[1:3])]
    expected = generate_answers(ours.model, ours.tokenizer, ours.preprocessor,
                                [Prompt(query_with_images(t, len(i)), i) for t, i in prompts],
                                system=ours.config.system_prompt, num_image_tokens=ours.config.vision.num_image_tokens,
                                max_new_tokens=max_new_tokens)
    conversations = [[{"role": "user", "content": content(text, images)}] for text, images in prompts]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padded
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=max_new_tokens)
    got = [answer.strip() for answer in
           processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert got == expected
    assert all(answer for answer in got)


# --------------------------------------------------------------------------------------------------
# The processor: chat template + image expansion = our prompt ids; the image processor = our pixels
# --------------------------------------------------------------------------------------------------


def content(text: str, images: list) -> list[dict]:
    """infer.py's prompt (with `<image>` marks, or none: images first) as a transformers content list."""
    if "<image>" not in text:
        return [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    items, pieces = [], text.split("<image>")
    for i, piece in enumerate(pieces):
        if i:
            items.append({"type": "image", "image": images[i - 1]})
        if piece:
            items.append({"type": "text", "text": piece})
    return items


# (system message or None for the default, [(user text, n images, answer or None)]); images are taken in order
CONVERSATIONS = {
    "default_system_one_image": (None, [("What colour is the shape?", 1, None)]),
    "empty_system_text_only": ("", [("Hello, how are you today?", 0, None)]),
    "own_system_two_images_inline": ("Answer briefly.", [("<image> vs <image>: which is brighter?", 2, None)]),
    "chinese_two_images_in_front": (None, [("图形在图片的哪个角？请用中文回答。", 2, None)]),
    "image_after_text": (None, [("Describe this picture: <image>", 1, None)]),
    "multi_turn": ("Be precise.", [("What is this?", 1, "A red circle."), ("And this one, <image>?", 1, None)]),
}


def check_processor_ids_and_pixels(ours: Ours, processor, name: str) -> None:
    """The processor's ids (chat template, image tokens expanded) and pixels for conversation `name` are our prompt
    ids and our preprocessing, exactly."""
    system, turns = CONVERSATIONS[name]
    images = iter(IMAGES)
    messages = [] if system is None else [{"role": "system", "content": system}]
    queries, used = [], []
    for text, n_images, answer in turns:
        turn_images = [next(images) for _ in range(n_images)]
        used += turn_images
        messages.append({"role": "user", "content": content(text, turn_images) if n_images else text})
        queries.append(query_with_images(text, n_images))
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    history = [(q, t[2]) for q, t in zip(queries[:-1], turns[:-1])]
    expected = build_prompt_ids(ours.tokenizer, queries[-1], history,
                                ours.config.system_prompt if system is None else system,
                                ours.config.vision.num_image_tokens)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected
    if used:
        torch.testing.assert_close(inputs["pixel_values"], ours.preprocessor(used), atol=0, rtol=0)
    else:
        assert "pixel_values" not in inputs


def check_whole_conversation(ours: Ours, processor) -> None:
    """Without a generation prompt, a conversation ending with an answer is our training sequence's input_ids."""
    turns = [{"role": "user", "content": query_with_images("What is it?", 1)},
             {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "这是什么颜色？"}, {"role": "assistant", "content": "红色。"}]
    messages = [{"role": "user", "content": content("What is it?", IMAGES[:1])}, *turns[1:]]
    ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0]
    expected = encode_conversation(ours.tokenizer, turns, system=ours.config.system_prompt,
                                   num_image_tokens=ours.config.vision.num_image_tokens, max_length=None)
    assert ids == expected.input_ids


def check_image_processor(ours: Ours, processor, mode: str) -> None:
    images = [make_image(10, 300, 200, mode), make_image(11, 31, 47, mode), make_image(12, 57, 56, mode)]
    got = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, ours.preprocessor(images), atol=0, rtol=0)


def check_refuses_special_text(processor, typed: str) -> None:
    """The chat template refuses `typed` in a user message (string or text item) and in a system message."""
    for message in ({"role": "user", "content": f"say {typed} now"},
                    {"role": "user", "content": [{"type": "text", "text": typed}]},
                    {"role": "system", "content": typed}):
        with pytest.raises(TemplateError, match="special"):
            processor.apply_chat_template([message], add_generation_prompt=True)


def check_look_alikes_stay_text(ours: Ours, processor, text: str) -> None:
    """Text that is no special token of this tokenizer is accepted and gives our ids (it stays text)."""
    ids = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    assert ids[0] == build_prompt_ids(ours.tokenizer, text, [], ours.config.system_prompt,
                                      ours.config.vision.num_image_tokens)
