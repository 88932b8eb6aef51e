"""`python -m model.export --format llava` on QWen v1 + CLIP: the folder stock transformers loads, checked against our
own model.

A tiny trained bundle is exported once (fp32); the transformers model, processor and tokenizer loaded from the
folder must give our logits, our greedy tokens, our prompt ids and pixels, and our tokenizer's ids (the checks are
shared with the other backbones: tests/model/llava_helpers.py).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer, models
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from dataset.conversation import build_prompt_ids
from inference.generation import allowed_token_mask
from model.export import main as export_main
from model.export_llava import suppressed_token_ids, tokenizer_config, unlisted_token_ids
from qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenTokenizer
from qwen.fast_tokenizer import build_fast_tokenizer
from tests.model import llava_helpers as helpers

EOD, IM_START, IM_END = 151643, 151644, 151645  # the ChatML ids of the official vocabulary
IMAGE = IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def bundle(tiny_llm_dir, tiny_clip_dir, tmp_path_factory):
    """A bundle whose every trained tensor has a visible value: LoRA on all targets, trained embeddings, projector;
    with the evaluation and training records the model card reports."""
    folder = helpers.make_bundle(tmp_path_factory.mktemp("llava") / "bundle", tiny_llm_dir, tiny_clip_dir,
                                 train_embeddings=True)
    (folder / "eval_results.json").write_text(json.dumps({"epoch": 2.0, "eval_loss": 1.2345678}))
    (folder / "demo_eval.json").write_text(json.dumps({"accuracy_with_image": 0.97, "by_language": {"zh": 0.96},
                                                       "checkpoint": str(folder)}))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(
        {"global_step": 4, "epoch": 2.0, "log_history": [{"loss": 2.5, "step": 2}, {"loss": 1.75, "step": 4}]}))
    return folder


@pytest.fixture(scope="module")
def exported(bundle):
    return helpers.export_llava(bundle, bundle.parent / "exported")


@pytest.fixture(scope="module")
def ours(bundle):
    return helpers.load_ours(bundle)


@pytest.fixture(scope="module")
def hf_model(exported):
    return helpers.load_hf_model(exported)


@pytest.fixture(scope="module")
def processor(exported):
    return helpers.load_processor(exported)


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
    assert json.loads((exported / "processor_config.json").read_text())["num_additional_image_tokens"] == 1
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


def test_suppress_tokens_with_the_real_vocabulary(tok_real):
    """With Qwen-7B's 151,643 ranks the list holds every id our generation never produces, none left out."""
    never = (~allowed_token_mask(tok_real, 151936)).nonzero().flatten().tolist()
    assert suppressed_token_ids(tok_real, 151936) == never and len(never) == 290
    assert unlisted_token_ids(tok_real, 151936) == []


def test_model_card_reports_training_and_evaluation(exported):
    card = (exported / "README.md").read_text()
    assert "r = 4, alpha = 8" in card and "transformer.wte" not in card
    assert "| eval_loss | 1.2346 |" in card and "| accuracy_with_image | 0.97 |" in card
    assert "| by_language.zh | 0.96 |" in card
    assert "4 optimizer steps" in card and "last logged training loss 1.7500" in card
    assert "max_position_embeddings" in card and "dynamic NTK" in card
    assert "a CLIP vision tower" in card and "trained as QWen v1" in card and "c_attn → q/k/v_proj" in card
    assert "`<|extra_0|>` (id 151646)" in card and "CLS dropped" in card
    assert str(exported.parent) not in card  # no folder of the training machine


# --------------------------------------------------------------------------------------------------
# The model: logits and greedy tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(helpers.BATCHES))
def test_logits_equal_ours(ours, hf_model, name):
    helpers.check_logits(ours, hf_model, helpers.BATCHES[name], atol=1e-4)


def test_greedy_tokens_equal_ours(ours, hf_model):
    helpers.check_greedy_tokens(ours, hf_model)


def test_stock_pipeline_answers_like_infer(ours, hf_model, processor):
    helpers.check_stock_pipeline_answers(ours, hf_model, processor)


# --------------------------------------------------------------------------------------------------
# The processor: chat template + image expansion = our prompt ids; the image processor = our pixels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(helpers.CONVERSATIONS))
def test_processor_ids_and_pixels_equal_our_prompt(ours, processor, name):
    helpers.check_processor_ids_and_pixels(ours, processor, name)


def test_whole_conversation_renders_our_training_sequence(ours, processor):
    helpers.check_whole_conversation(ours, processor)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_processor_equals_our_preprocessing(ours, processor, mode):
    helpers.check_image_processor(ours, processor, mode)


@pytest.mark.parametrize(
    "typed", ["<|im_end|>", "<|im_start|>system\nx", "<|endoftext|>", "<|extra_0|>", "<|extra_137|>"]
)
def test_chat_template_refuses_special_token_text(processor, typed):
    helpers.check_refuses_special_text(processor, typed)


def test_chat_template_accepts_look_alikes_and_writes_them_as_text(ours, processor):
    # none of them is a special token of QWen v1 (Qwen2.5's image token is ordinary text here)
    helpers.check_look_alikes_stay_text(ours, processor, "<|extra_205|> <|im_end <|extra_x|> <im_end> <|image_pad|>")


def test_documented_difference_leading_line_break(ours, processor):
    """The one documented difference: text starting with a line break joins the "\\n" after the role name."""
    tokenizer = ours.tokenizer
    text = "\nWhat is it?"
    got = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)[0]
    expected = build_prompt_ids(tokenizer, text, [], ours.config.system_prompt, ours.config.vision.num_image_tokens)
    assert got != expected and tokenizer.decode(got) == tokenizer.decode(expected)


def test_sanitized_chat_template_gives_the_same_ids(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": helpers.IMAGES[0]},
                                             {"type": "text", "text": "Hi?"}]}]
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
def real_tokenizer_dir(tok_real_vocab_file, tok_real, tmp_path_factory):
    """The real vocabulary's tokenizer.json + tokenizer_config.json, as the export writes them (llm/qwen1.py)."""
    folder = tmp_path_factory.mktemp("real_tokenizer")
    (folder / "tokenizer.json").write_text(build_fast_tokenizer(tok_real_vocab_file).to_str(pretty=True))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok_real, model_max_length=8192)))
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
    assert real_fast_tokenizer.encode(text, add_special_tokens=False) == tok_real.encode(
        unicodedata.normalize("NFC", text))


# --------------------------------------------------------------------------------------------------
# Options and bad input
# --------------------------------------------------------------------------------------------------


def test_bf16_export_then_overwritten_in_fp32(bundle, tmp_path):
    """bf16 on request; --overwrite replaces a previous llava export (it carries the list of its files)."""
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
        (["--output", str(tmp_path / "mine"), "--overwrite"], "is not a previous output of"),  # never another folder
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
    code = export_main(["--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "y"),
                        "--format", "llava"])
    assert code == 2 and not (tmp_path / "y").exists()


def test_exported_folder_can_be_moved(exported, tmp_path):
    """Nothing in the folder points back to the bundle or the base models."""
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    for path in moved.iterdir():
        if path.suffix in (".json", ".md", ".jinja"):
            text = path.read_text()
            assert str(exported) not in text and "tiny-qwen" not in text.replace("`tiny-qwen`", "")
    AutoProcessor.from_pretrained(moved)
    AutoModelForImageTextToText.from_pretrained(moved)
