"""`python -m model.export --format llava`: the folder stock transformers loads, checked against our own model.

A tiny trained bundle is exported once (fp32); the transformers model, processor and tokenizer loaded from the
folder must give our logits, our greedy tokens, our prompt ids and pixels, and our tokenizer's ids.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2 import TemplateError
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, GenerationConfig
from transformers.utils import is_torchvision_available

from dataset.conversation import build_prompt_ids, encode_conversation
from inference import Prompt, generate_answers, query_with_images
from inference.generation import allowed_token_mask, prompt_tensors
from model import apply_lora, build_vlm, bundle_config_for, load_vlm, save_bundle
from model.export import main as export_main
from model.export_llava import write_tokenizer_files
from qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenTokenizer
from visual import CLIPImagePreprocessor

EOD, IM_START, IM_END = 151643, 151644, 151645  # the ChatML ids of the official vocabulary
IMAGE = IMAGE_TOKEN_ID
SYSTEM = 'You are a "test" assistant.\nAnswer briefly; 简短回答 🙂'


def _image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    if mode == "P":  # a palette image
        return _image(seed, width, height).convert("P")
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


IMAGES = [_image(0, 80, 60), _image(1, 50, 90), _image(2, 56, 56), _image(3, 120, 70)]


@pytest.fixture(scope="module")
def bundle(tiny_llm_dir, tiny_clip_dir, tmp_path_factory):
    """A bundle whose every trained tensor has a visible value: LoRA on all targets, trained embeddings, projector."""
    folder = tmp_path_factory.mktemp("llava") / "bundle"
    model = build_vlm(tiny_llm_dir, tiny_clip_dir)
    peft_model = apply_lora(model, r=4, alpha=8, train_embeddings=True, verbose=False)
    torch.manual_seed(1)
    never = ~allowed_token_mask(QWenTokenizer.from_pretrained(tiny_llm_dir), model.config.vocab_size)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2 if "lora_" in name or "projector" in name else 0.05)
            if "lm_head" in name:  # as in a trained model, the ids no answer holds never score first (their score
                p.data[never] = 0.0  # is 0, below the best of 1,027 random ones): the export need not list them all
    save_bundle(peft_model.eval(), folder, bundle_config_for(model, tiny_llm_dir, tiny_clip_dir, SYSTEM))
    (folder / "eval_results.json").write_text(json.dumps({"epoch": 2.0, "eval_loss": 1.2345678}))
    (folder / "demo_eval.json").write_text(json.dumps({"accuracy_with_image": 0.97, "by_language": {"zh": 0.96},
                                                       "checkpoint": str(folder)}))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(
        {"global_step": 4, "epoch": 2.0, "log_history": [{"loss": 2.5, "step": 2}, {"loss": 1.75, "step": 4}]}))
    return folder


@pytest.fixture(scope="module")
def exported(bundle):
    out = bundle.parent / "exported"
    code = export_main(["--checkpoint", str(bundle), "--output", str(out), "--format", "llava", "--dtype", "fp32",
                        "--max-shard-gb", "0.01"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ours(bundle):
    model, config = load_vlm(bundle)
    llm_path, vision_path = config.resolve(bundle)
    return model.eval(), config, QWenTokenizer.from_pretrained(llm_path), CLIPImagePreprocessor.from_pretrained(vision_path)


@pytest.fixture(scope="module")
def hf_model(exported):
    model, info = AutoModelForImageTextToText.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mis-shaped tensor
    return model.eval()


@pytest.fixture(scope="module")
def processor(exported):
    """The PIL implementation of the CLIP processor (transformers' choice here, where torchvision is absent)."""
    return AutoProcessor.from_pretrained(exported, backend="pil")


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------


def test_folder_is_a_stock_llava_with_a_qwen2_text_model(exported, hf_model, processor, tiny_llm_dir):
    assert type(hf_model).__name__ == "LlavaForConditionalGeneration"
    config = hf_model.config
    qwen = json.loads((tiny_llm_dir / "config.json").read_text())
    assert config.image_token_id == IMAGE and config.vision_feature_select_strategy == "default"
    assert config.vision_feature_layer == -2 and config.vision_config.model_type == "clip_vision_model"
    text = config.text_config
    assert text.model_type == "qwen2" and text.intermediate_size == qwen["intermediate_size"] // 2
    assert text.max_position_embeddings == qwen["seq_length"] and text.num_key_value_heads == text.num_attention_heads
    # sharded safetensors with an index; nothing that would need remote code
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not list(exported.glob("*.py")) and "auto_map" not in (exported / "config.json").read_text()
    assert type(processor).__name__ == "LlavaProcessor" and processor.image_token == IMAGE_TAG
    default = AutoProcessor.from_pretrained(exported)  # without torchvision: the PIL one, equal to our pixels
    assert is_torchvision_available() or type(default.image_processor).__name__ == "CLIPImageProcessorPil"
    assert processor.image_token_id == IMAGE
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [IM_END, IM_START, EOD] and generation["do_sample"] is False


def test_suppress_tokens_lists_the_specials_no_answer_holds(exported, tiny_llm_dir):
    """The <|extra_N|> tokens and the rows past the last special (290 ids, as for Qwen-7B's vocabulary); not the
    150,619 ids between the tiny tokenizer's last rank and the first special (a 1.7 MB list), which the model
    card says."""
    never = (~allowed_token_mask(QWenTokenizer.from_pretrained(tiny_llm_dir), 151936)).nonzero().flatten().tolist()
    suppressed = json.loads((exported / "generation_config.json").read_text())["suppress_tokens"]
    assert suppressed == [i for i in never if i >= EOD] and len(suppressed) == 205 + 85
    assert IMAGE in suppressed and EOD not in suppressed and IM_END not in suppressed
    card = (exported / "README.md").read_text()
    assert "lists the 290 ids" in card and "150,619 more ids" in card


def test_model_card_reports_training_and_evaluation(exported):
    card = (exported / "README.md").read_text()
    assert "r = 4, alpha = 8" in card and "transformer.wte" not in card
    assert "| eval_loss | 1.2346 |" in card and "| accuracy_with_image | 0.97 |" in card
    assert "| by_language.zh | 0.96 |" in card
    assert "4 optimizer steps" in card and "last logged training loss 1.7500" in card
    assert "max_position_embeddings" in card and "dynamic NTK" in card
    assert str(exported.parent) not in card  # no folder of the training machine


# --------------------------------------------------------------------------------------------------
# The model: logits and greedy tokens
# --------------------------------------------------------------------------------------------------


BATCHES = {
    "one_image": [Prompt(f"{IMAGE_TAG}\nWhat colour is the shape?", IMAGES[:1])],
    "two_images_one_prompt": [Prompt(f"Compare {IMAGE_TAG} with {IMAGE_TAG}: which is brighter?", IMAGES[1:3])],
    "left_padded_batch": [
        Prompt(f"{IMAGE_TAG}\n图形在图片的哪个角？", IMAGES[3:4]),
        Prompt(f"{IMAGE_TAG}\n{IMAGE_TAG}\nDescribe both pictures in one long sentence, please.", IMAGES[:2]),
        Prompt("A question without an image.", []),
    ],
}


def _our_batch(ours, prompts):
    model, config, tokenizer, preprocessor = ours
    return prompt_tensors(prompts, tokenizer, preprocessor, config.system_prompt, config.num_image_tokens)


@pytest.mark.parametrize("name", list(BATCHES))
def test_logits_equal_ours(ours, hf_model, name):
    ids, mask, pixels = _our_batch(ours, BATCHES[name])
    assert (ids == IMAGE).sum() == 16 * (0 if pixels is None else len(pixels))
    with torch.no_grad():
        expected = ours[0](input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = hf_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()  # padding positions attend to nothing real; their logits mean nothing in either model
    assert expected[real].abs().max() > 0.1  # logits with something in them
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_greedy_tokens_equal_ours(ours, hf_model):
    ids, mask, pixels = _our_batch(ours, BATCHES["left_padded_batch"])
    # The same plain greedy search for both: no penalty, no suppressed ids, no stop (all 10 tokens compared).
    plain = GenerationConfig(do_sample=False, max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.0,
                             suppress_tokens=[], eos_token_id=[IM_END], pad_token_id=EOD)
    with torch.no_grad():
        expected = ours[0].generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=plain)
        got = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=plain)
    assert got.shape == (3, ids.shape[1] + 10)
    assert got.tolist() == expected.tolist()
    assert len(set(got[:, ids.shape[1]:].flatten().tolist())) > 3  # not one token repeated


def test_stock_pipeline_answers_like_infer(ours, hf_model, processor):
    """processor + chat template + generate() with the exported generation_config == model.generation's answers,
    for a left-padded batch of two conversations."""
    model, config, tokenizer, preprocessor = ours
    prompts = [("What colour is the shape?", IMAGES[:1]), ("<image> or <image>: which one is darker?", IMAGES[1:3])]
    expected = generate_answers(model, tokenizer, preprocessor, [Prompt(query_with_images(t, len(i)), i) for t, i in prompts],
                                system=config.system_prompt, num_image_tokens=config.num_image_tokens,
                                max_new_tokens=8)
    conversations = [[{"role": "user", "content": _content(text, images)}] for text, images in prompts]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padded
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=8)
    got = [answer.strip() for answer in
           processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert got == expected
    assert all(answer for answer in got)


# --------------------------------------------------------------------------------------------------
# The processor: chat template + image expansion = our prompt ids; the image processor = our pixels
# --------------------------------------------------------------------------------------------------


def _content(text: str, images: list) -> list[dict]:
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


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_processor_ids_and_pixels_equal_our_prompt(ours, processor, name):
    model, config, tokenizer, preprocessor = ours
    system, turns = CONVERSATIONS[name]
    images = iter(IMAGES)
    messages = [] if system is None else [{"role": "system", "content": system}]
    queries, used = [], []
    for text, n_images, answer in turns:
        turn_images = [next(images) for _ in range(n_images)]
        used += turn_images
        messages.append({"role": "user", "content": _content(text, turn_images) if n_images else text})
        queries.append(query_with_images(text, n_images))
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    history = [(q, t[2]) for q, t in zip(queries[:-1], turns[:-1])]
    expected = build_prompt_ids(tokenizer, queries[-1], history, config.system_prompt if system is None else system,
                                config.num_image_tokens)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected
    if used:
        torch.testing.assert_close(inputs["pixel_values"], preprocessor(used), atol=0, rtol=0)
    else:
        assert "pixel_values" not in inputs


def test_whole_conversation_renders_our_training_sequence(ours, processor):
    """Without a generation prompt, a conversation ending with an answer is our training sequence's input_ids."""
    tokenizer = ours[2]
    turns = [{"role": "user", "content": query_with_images("What is it?", 1)}, {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "这是什么颜色？"}, {"role": "assistant", "content": "红色。"}]
    messages = [{"role": "user", "content": _content("What is it?", IMAGES[:1])}, *turns[1:]]
    ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0]
    expected = encode_conversation(tokenizer, turns, system=ours[1].system_prompt, num_image_tokens=ours[1].num_image_tokens,
                                   max_length=None)
    assert ids == expected.input_ids


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_processor_equals_our_preprocessing(ours, processor, mode):
    preprocessor = ours[3]
    images = [_image(10, 300, 200, mode), _image(11, 31, 47, mode), _image(12, 57, 56, mode)]  # larger, smaller, odd
    got = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, preprocessor(images), atol=0, rtol=0)


@pytest.mark.parametrize("typed", ["<|im_end|>", "<|im_start|>system\nx", "<|endoftext|>", "<|extra_0|>", "<|extra_137|>"])
def test_chat_template_refuses_special_token_text(processor, typed):
    for message in ({"role": "user", "content": f"say {typed} now"},
                    {"role": "user", "content": [{"type": "text", "text": typed}]},
                    {"role": "system", "content": typed}):
        with pytest.raises(TemplateError, match="special"):
            processor.apply_chat_template([message], add_generation_prompt=True)


def test_chat_template_accepts_look_alikes_and_writes_them_as_text(ours, processor):
    tokenizer = ours[2]
    text = "<|extra_205|> <|im_end <|extra_x|> <im_end>"  # none of them is a special token
    ids = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    assert ids[0] == build_prompt_ids(tokenizer, text, [], ours[1].system_prompt, ours[1].num_image_tokens)


def test_documented_difference_leading_line_break(ours, processor):
    """The one documented difference: text starting with a line break joins the "\\n" after the role name."""
    tokenizer = ours[2]
    text = "\nWhat is it?"
    got = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)[0]
    expected = build_prompt_ids(tokenizer, text, [], ours[1].system_prompt, ours[1].num_image_tokens)
    assert got != expected and tokenizer.decode(got) == tokenizer.decode(expected)


def test_sanitized_chat_template_gives_the_same_ids(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Hi?"}]}]
    plain, sanitized = (processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, sanitize_control_tokens=flag)["input_ids"]
                        for flag in (False, True))
    assert plain == sanitized


# --------------------------------------------------------------------------------------------------
# The fast tokenizer equals ours
# --------------------------------------------------------------------------------------------------

CORPUS = {
    "english": "Hello, world! It's a test: we'll see what they've done; I'M sure you'd LIKE it. Don't stop.",
    "rare_words": "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis Zyxwvut",
    "chinese": "这是什么？图片的左上角有一个红色的圆形。今天天气很好，我们去公园散步吧！机器学习模型",
    "code": 'def f(x):\n\treturn {"a": x ** 2}  # comment\n\nif __name__ == "__main__":\n    print(f(3))\r\n',
    "emoji": "I \u2764\ufe0f \U0001f99c and \U0001f469\u200d\U0001f469\u200d\U0001f467 family \U0001f1e8\U0001f1f3!",
    "whitespace_runs": "a  b   c\t\td \r\n e\n\n\n  f   \n\t \r\n   x\r\r\n" + " " * 40 + "y" + "\n" * 9 + "\t" * 5,
    "user_typed_specials": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|extra_0|>x<|extra_204|> <|im_end|>",
    "near_specials": "<|im_start <|extra_205|> <|endoftext| <im_end> <|IM_START|> <<|im_end|>>",
    "mixed_scripts": "Qwen是一个LLM模型, version 7B (七十亿参数) \u2014 مرحبا Привет こんにちは 안녕하세요 123.45%",
    "numbers": "3.14159 2024-01-01 1,000,000 \u0661\u0662\u0663 12345678901234567890",
    "normalisation": "Cafe\u0301 re\u0301sume\u0301 \u212b A\u030a n\u0303o <|im_end|>\u0338 'S 'ſ 'LL",
    "control": "\x00\x01\x7f\u200b\ufeff tab\there",
    "empty": "",
}


def _check_same_as_ours(fast, ours_tokenizer):
    for name, text in CORPUS.items():
        # default: special-token text becomes the special ids (QWenTokenizer.encode's default too)
        assert fast.encode(text, add_special_tokens=False) == ours_tokenizer.encode(text), name
        # user text: specials stay text, as our prompt builders encode every message
        as_text = ours_tokenizer.encode(text, allowed_special=set())
        assert fast.encode(text, add_special_tokens=False, split_special_tokens=True) == as_text, name
        assert fast(text, split_special_tokens=True)["input_ids"] == as_text, name
        ids = ours_tokenizer.encode(text)
        for cut in {len(ids), len(ids) // 2, len(ids) // 3 + 1}:  # cuts may split a character's bytes
            assert fast.decode(ids[:cut]) == ours_tokenizer.decode(ids[:cut]), (name, cut)
    every_special = list(range(EOD, EOD + 208))
    assert fast.convert_ids_to_tokens(every_special) == [ours_tokenizer.decode([i]) for i in every_special]


def test_fast_tokenizer_equals_ours_tiny_vocab(exported, tiny_llm_dir):
    fast = AutoTokenizer.from_pretrained(exported)
    ours_tokenizer = QWenTokenizer.from_pretrained(tiny_llm_dir)
    assert len(ours_tokenizer.mergeable_ranks) < EOD  # ids left free below the specials
    _check_same_as_ours(fast, ours_tokenizer)
    assert fast.chat_template is not None and fast.eos_token == "<|im_end|>" and fast.pad_token_id == EOD


@pytest.fixture(scope="module")
def real_tokenizer_dir(tok_real_vocab_file, tmp_path_factory):
    """The real vocabulary's tokenizer.json + tokenizer_config.json, as the export writes them."""
    folder = tmp_path_factory.mktemp("real_tokenizer")
    write_tokenizer_files(folder, vocab_file=Path(tok_real_vocab_file), model_max_length=8192)
    return folder


@pytest.fixture(scope="module")
def real_fast_tokenizer(real_tokenizer_dir):
    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


def test_fast_tokenizer_equals_ours_real_vocab(real_fast_tokenizer, tok_real):
    _check_same_as_ours(real_fast_tokenizer, tok_real)
    assert len(real_fast_tokenizer) == 151851


def test_fast_tokenizer_equals_ours_on_a_long_mixed_text(real_fast_tokenizer, tok_real):
    """Every piece boundary of a few KB of text at once, including the README and this file's own source."""
    here = Path(__file__).read_text(encoding="utf-8")
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    text = here + readme + "".join(CORPUS.values())
    assert real_fast_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == \
        tok_real.encode(text, allowed_special=set())


def test_rebuilt_merges_reach_every_token_of_the_real_vocab(real_tokenizer_dir):
    """BPE with the merges alone (not taking whole tokens) turns each token's bytes into that very token."""
    model = json.loads((real_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(model["merges"]) == 151643 - 256
    bpe = Tokenizer(models.BPE(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], ignore_merges=False))
    tokens = sorted(model["vocab"].items(), key=lambda item: item[1])
    encoded = bpe.encode_batch([token for token, _ in tokens])
    wrong = [(token, i, e.ids) for (token, i), e in zip(tokens, encoded) if e.ids != [i]]
    assert not wrong, wrong[:5]


def test_tokenizer_normalises_like_ours(real_fast_tokenizer, tok_real):
    text = "e\u0301\u212b"
    assert real_fast_tokenizer.encode(text, add_special_tokens=False) == tok_real.encode(unicodedata.normalize("NFC", text))


# --------------------------------------------------------------------------------------------------
# Options and bad input
# --------------------------------------------------------------------------------------------------


def test_bf16_export_then_overwritten_in_fp32(bundle, tmp_path):
    """bf16 on request; --overwrite replaces a previous llava export (it carries the export's marker)."""
    out = tmp_path / "bf16"
    assert export_main(["--checkpoint", str(bundle), "--output", str(out), "--format", "llava", "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert export_main(["--checkpoint", str(bundle), "--output", str(out), "--format", "llava", "--dtype", "fp32",
                        "--overwrite"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118


def test_bad_input_is_one_line_and_status_2(bundle, exported, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cases = [
        (["--output", str(exported)], "exists and is not empty"),  # not replaced without --overwrite
        (["--output", str(tmp_path / "mine"), "--overwrite"], "is not a previous export"),  # never another folder
        (["--output", str(bundle), "--overwrite"], "is or contains the checkpoint being read"),
        (["--output", str(bundle / "inside")], "is inside the checkpoint being read"),
        (["--output", str(tmp_path / "x"), "--no-copy-vision"], "--format qwen only"),
    ]
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    for extra, message in cases:
        code = export_main(["--checkpoint", str(bundle), "--format", "llava", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("export: error: ") and message in err, (extra, err)
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (bundle / "inside").exists()
    code = export_main(["--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "y"), "--format", "llava"])
    assert code == 2 and not (tmp_path / "y").exists()


def test_exported_folder_can_be_moved(exported, tmp_path):
    """Nothing in the folder points back to the bundle or the base models."""
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    for path in moved.iterdir():
        if path.suffix in (".json", ".md", ".jinja"):
            assert str(exported) not in path.read_text() and "tiny-qwen" not in path.read_text().replace("`tiny-qwen`", "")
    AutoProcessor.from_pretrained(moved)
    AutoModelForImageTextToText.from_pretrained(moved)
