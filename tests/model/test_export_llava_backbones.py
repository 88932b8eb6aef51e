"""`python -m model.export --format llava` for the other backbones: Qwen2.5 / Qwen3 with CLIP or SigLIP.

Each pair is built in the published layouts (llm.tiny, visual.write_tiny_*_checkpoint), trained-looking (LoRA and
projector with visible random values; untied embeddings trained in full too; the head's rows of the ids the tiny
tokenizer lacks at 0, as a trained model scores them below its answers), exported in fp32, and loaded by stock
transformers: its `LlavaForConditionalGeneration` must give our logits (1e-5) and greedy tokens, its processor +
chat template + `generate()` our answers, its processor our prompt ids and pixels (the checks of
tests/model/llava_helpers.py, shared with the QWen v1 + CLIP tests). The folder must hold the LLM as it is: its
own config as text_config, its own tensor names, its own tokenizer.json, its own image token.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from inference.generation import allowed_token_mask
from llm.qwen2_tokenizer import Qwen2Tokenizer
from model.export import main as export_main
from model.export_llava import suppressed_token_ids, unlisted_token_ids
from model.llava_chat_template import chat_template
from tests.model import llava_helpers as helpers
from visual import write_tiny_siglip_checkpoint

EOD, IM_START, IM_END, IMAGE_PAD = 151643, 151644, 151645, 151655  # Qwen2.5 / Qwen3 ids

# pair -> (published LLM layout, vision tower). Qwen2.5-7B-Instruct: untied, 152064 rows, 4 shards (its embeddings
# are trained too); Qwen2.5-1.5B-Instruct and Qwen3-1.7B: tied embeddings (no lm_head tensor); Qwen3: head_dim and
# q/k norms.
PAIRS = {
    "qwen2.5+clip": ("Qwen/Qwen2.5-7B-Instruct", "clip"),
    "qwen2.5-tied+siglip": ("Qwen/Qwen2.5-1.5B-Instruct", "siglip"),
    "qwen3-tied+siglip": ("Qwen/Qwen3-1.7B", "siglip"),
}
# The checks that generate (seconds each at a 152k vocabulary) run on the two Qwen2 pairs of the issue's "Done
# when"; Qwen3 differs from them only in the text model, which the logits of a left-padded batch check.
GENERATING_PAIRS = ["qwen2.5+clip", "qwen2.5-tied+siglip"]
TIED_PAIRS = ["qwen2.5-tied+siglip", "qwen3-tied+siglip"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP in the so400m layout at 60 px, patch 14: not a multiple, as 384 / 14 is (4 x 4 = 16 patches)."""
    return write_tiny_siglip_checkpoint(tmp_path_factory.mktemp("siglip") / "tiny-siglip", image_size=60, seed=2)


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, tmp_path_factory, tiny_clip_dir, siglip_dir):
    """One pair: its folders, its bundle and export, our model and transformers' loaded from them."""
    repo, vision = PAIRS[request.param]
    root = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    llm_dir = helpers.write_quiet_qwen2_checkpoint(root / repo.split("/")[1], repo, seed=5)
    llm_config = json.loads((llm_dir / "config.json").read_text())
    vision_dir = tiny_clip_dir if vision == "clip" else siglip_dir
    bundle = helpers.make_bundle(root / "bundle", llm_dir, vision_dir,
                                 train_embeddings=not llm_config["tie_word_embeddings"])
    exported = helpers.export_llava(bundle, root / "exported")
    return SimpleNamespace(name=request.param, vision=vision, llm_dir=llm_dir, llm_config=llm_config,
                           vision_dir=vision_dir, bundle=bundle, exported=exported, ours=helpers.load_ours(bundle),
                           hf_model=helpers.load_hf_model(exported), processor=helpers.load_processor(exported))


def _json(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------


def test_text_half_is_the_llm_as_published(pair):
    """text_config is the LLM's own config; its tensors are the LLM's own, under llava-hf's names (tied: no head)."""
    config, published = _json(pair.exported, "config.json"), pair.llm_config
    text = config["text_config"]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "max_window_layers", "use_sliding_window", "architectures"):
        assert text[key] == published[key], key
    assert text["rope_parameters"]["rope_theta"] == published["rope_theta"]
    assert text.get("head_dim") == published.get("head_dim")  # Qwen3's own field; Qwen2.5 has none
    assert "_name_or_path" not in text and "dtype" not in text and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] == published["tie_word_embeddings"]

    names = helpers.safetensors_names(pair.exported)
    exported_text = {n.removeprefix("language_model.") for n in names if n.startswith("language_model.")}
    assert exported_text == helpers.safetensors_names(pair.llm_dir)
    assert ("lm_head.weight" in exported_text) == (not published["tie_word_embeddings"])
    hf = pair.hf_model
    if published["tie_word_embeddings"]:  # transformers ties the head to the embeddings it loaded
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    else:  # the trained copies (lora.train_embeddings) went out, not the base ones
        torch.testing.assert_close(hf.lm_head.weight, pair.ours.model.llm.lm_head.weight, atol=0, rtol=0)


def test_vision_half_is_the_tower(pair):
    config, processor_config = _json(pair.exported, "config.json"), _json(pair.exported, "processor_config.json")
    names = {n.removeprefix("vision_tower.vision_model.") for n in helpers.safetensors_names(pair.exported)
             if n.startswith("vision_tower.")}
    assert config["vision_feature_layer"] == -2 and config["image_seq_length"] == 16
    if pair.vision == "clip":
        assert config["vision_config"]["model_type"] == "clip_vision_model"
        strategy = processor_config["vision_feature_select_strategy"]
        assert config["vision_feature_select_strategy"] == strategy == "default"
        assert processor_config["num_additional_image_tokens"] == 1  # the CLS row, dropped again by "default"
    else:  # the vision half of the SigLIP checkpoint, without the pooling head; every patch is a feature
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        assert config["vision_config"]["vision_use_head"] is False and config["vision_config"]["image_size"] == 60
        assert config["vision_feature_select_strategy"] == processor_config["vision_feature_select_strategy"] == "full"
        assert processor_config["num_additional_image_tokens"] == 0
        assert not any(n.startswith("head.") for n in names) and "post_layernorm.weight" in names
        assert _json(pair.exported, "preprocessor_config.json")["image_processor_type"] == "SiglipImageProcessor"
    assert len(names) == len(pair.hf_model.model.vision_tower.state_dict())  # every tensor of the model, no other


def test_tokenizer_and_image_token_are_the_llm_s(pair):
    assert (pair.exported / "tokenizer.json").read_bytes() == (pair.llm_dir / "tokenizer.json").read_bytes()
    tokenizer_config = _json(pair.exported, "tokenizer_config.json")
    assert (tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer_config["padding_side"] == "left"
    assert _json(pair.exported, "config.json")["image_token_index"] == IMAGE_PAD == pair.ours.tokenizer.image_token_id
    assert pair.processor.image_token == "<|image_pad|>" and pair.processor.image_token_id == IMAGE_PAD
    generation = _json(pair.exported, "generation_config.json")
    assert generation["eos_token_id"] == [IM_END, IM_START, EOD] and generation["pad_token_id"] == EOD
    assert IMAGE_PAD in generation["suppress_tokens"] and IM_END not in generation["suppress_tokens"]


def test_suppress_tokens_lists_the_added_tokens_no_answer_holds(pair):
    """The added tokens other than the three stop tokens (19 of Qwen2.5's 22; 23 of Qwen3's 26, `<think>` among them)
    and the rows past the tokenizer; not the 150,619 ids below the first added token that the tiny tokenizer has no
    token for (a 1.7 MB list), which the model card says."""
    vocab_size, added = pair.llm_config["vocab_size"], {"qwen2": 22, "qwen3": 26}[pair.llm_config["model_type"]]
    never = (~allowed_token_mask(pair.ours.tokenizer, vocab_size)).nonzero().flatten().tolist()
    suppressed = _json(pair.exported, "generation_config.json")["suppress_tokens"]
    assert suppressed == [i for i in never if i >= EOD]
    assert len(suppressed) == (added - 3) + (vocab_size - EOD - added)
    card = (pair.exported / "README.md").read_text(encoding="utf-8")
    assert f"lists the {len(suppressed)} ids" in card and "`<|image_pad|>` among them" in card
    assert "150,619 more ids" in card


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_suppress_tokens_with_the_published_vocabulary(family, tok_real_qwen2_tokenizer_dir):
    """With the published 151,643 ranks the list holds every id our generation never produces, none left out: 290
    of 151,936 rows (Qwen2.5-1.5B/3B, Qwen3), 418 of Qwen2.5-7B's 152,064."""
    tokenizer = Qwen2Tokenizer.from_pretrained(tok_real_qwen2_tokenizer_dir(family))
    for vocab_size, count in [(151936, 290), (152064, 418)]:
        never = (~allowed_token_mask(tokenizer, vocab_size)).nonzero().flatten().tolist()
        assert suppressed_token_ids(tokenizer, vocab_size) == never and len(never) == count
        assert unlisted_token_ids(tokenizer, vocab_size) == []


def test_model_card_names_the_backbones(pair):
    card = (pair.exported / "README.md").read_text(encoding="utf-8")
    vision = {"clip": "a CLIP vision tower", "siglip": "a SigLIP vision tower"}[pair.vision]
    language = {"qwen2": "a Qwen2 language model", "qwen3": "a Qwen3 language model"}[pair.llm_config["model_type"]]
    assert vision in card and language in card and "`<|image_pad|>` (id 151655)" in card
    assert ("every patch" in card) == (pair.vision == "siglip")
    tied = "tied input and output embeddings" in card and "untied" not in card
    assert tied == pair.llm_config["tie_word_embeddings"]
    assert "QWen v1" not in card and "dynamic NTK" not in card and "c_attn" not in card
    assert str(pair.exported.parent) not in card  # no folder of the training machine


def test_format_qwen_refuses_other_families(pair, capsys):
    output = pair.exported.parent / "as-qwen"
    code = export_main(["--checkpoint", str(pair.bundle), "--output", str(output), "--format", "qwen"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "QWen v1 language model only" in err and "--format llava" in err
    assert not output.exists()


@pytest.mark.parametrize("pair", TIED_PAIRS, indirect=True)
def test_tied_head_that_differs_is_refused(pair):
    """A merged model whose config says tied but whose head is not the embeddings cannot go out as tied."""
    assert pair.llm_config["tie_word_embeddings"]
    llm = copy.deepcopy(pair.ours.model.llm)
    llm.lm_head.weight = torch.nn.Parameter(llm.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match="weights differ"):
        pair.ours.model.text_family.to_transformers(llm, pair.llm_dir)


# --------------------------------------------------------------------------------------------------
# Parity: logits, greedy tokens, answers
# --------------------------------------------------------------------------------------------------


def test_logits_equal_ours_left_padded_batch(pair):
    """One image, two images and no image, left padded."""
    helpers.check_logits(pair.ours, pair.hf_model, helpers.BATCHES["left_padded_batch"], atol=1e-5)


@pytest.mark.parametrize("pair", GENERATING_PAIRS, indirect=True)
@pytest.mark.parametrize("name", ["one_image", "two_images_one_prompt"])
def test_logits_equal_ours_unpadded(pair, name):
    helpers.check_logits(pair.ours, pair.hf_model, helpers.BATCHES[name], atol=1e-5)


@pytest.mark.parametrize("pair", GENERATING_PAIRS, indirect=True)
def test_stock_pipeline_answers_like_infer(pair):
    """Greedy answers: `inference.generate_answers` == processor + chat template + generate() (a left-padded batch)."""
    # 5 new tokens (seconds each at a 152k vocabulary); the LLM folder's head gives the ids the tiny vocabulary lacks
    # a score of 0, as a trained model would (helpers.write_quiet_qwen2_checkpoint): suppress_tokens does not list them
    helpers.check_stock_pipeline_answers(pair.ours, pair.hf_model, pair.processor, max_new_tokens=5)


# --------------------------------------------------------------------------------------------------
# The processor and the chat template
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(helpers.CONVERSATIONS))
def test_processor_ids_and_pixels_equal_our_prompt(pair, name):
    helpers.check_processor_ids_and_pixels(pair.ours, pair.processor, name)


def test_whole_conversation_renders_our_training_sequence(pair):
    helpers.check_whole_conversation(pair.ours, pair.processor)


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_image_processor_equals_our_preprocessing(pair, mode):
    helpers.check_image_processor(pair.ours, pair.processor, mode)


# Added tokens of Qwen2.5 and Qwen3, special or not in the published files: each would become its id in a rendered
# prompt, while our prompts keep typed text as text.
ADDED = ["<|im_end|>", "<|im_start|>user", "<|endoftext|>", "<|image_pad|>", "<|vision_start|>", "<tool_call>",
         "<|fim_prefix|>", "<think>"]


@pytest.mark.parametrize("typed", ADDED)
def test_chat_template_refuses_added_token_text(pair, typed):
    if typed == "<think>" and pair.llm_config["model_type"] != "qwen3":
        helpers.check_look_alikes_stay_text(pair.ours, pair.processor, f"say {typed} now")  # Qwen2.5 has no <think>
    else:
        helpers.check_refuses_special_text(pair.processor, typed)


def test_chat_template_accepts_look_alikes_and_writes_them_as_text(pair):
    # QWen v1's image tag is ordinary text for Qwen2.5 / Qwen3
    helpers.check_look_alikes_stay_text(pair.ours, pair.processor,
                                        "<|extra_0|> <|im_end <|image_pad| <tool_call > <im_end> <<|vision_end>")


def test_system_prompt_with_added_token_text_is_refused(pair):
    """The trained system prompt becomes the template's default; text of an added token cannot be written there."""
    tokenizer = pair.ours.tokenizer
    with pytest.raises(ValueError, match=r"special token <tool_call>"):
        chat_template("Use <tool_call> when asked.", tokenizer)
    assert "<|extra_0|>" in chat_template("QWen v1's tag <|extra_0|> is text here.", tokenizer)
