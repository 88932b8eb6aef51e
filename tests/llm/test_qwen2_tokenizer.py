"""llm.Qwen2Tokenizer against transformers' AutoTokenizer on the same folder, and against QWenTokenizer on the
same qwen.tiktoken (the BPE that Qwen2.5 shares with Qwen-7B), on the tiny and the real vocabularies."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import unicodedata
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llm import Qwen2Tokenizer
from llm.tiny import QWEN2_5_ADDED_TOKENS, QWEN3_ADDED_TOKENS

EOD, IM_START, IM_END, IMAGE_PAD = 151643, 151644, 151645, 151655
THINK, END_THINK = 151667, 151668

CORPUS = {
    "english": "Hello, world! It's a test: we'll see what they've done; I'M sure you'd LIKE it. Don't stop.",
    "chinese": "这是什么？图片的左上角有一个红色的圆形。今天天气很好，我们去公园散步吧！",
    "emoji": "I \u2764\ufe0f \U0001f99c and \U0001f469\u200d\U0001f469\u200d\U0001f467 family \U0001f1e8\U0001f1f3!",
    "typed_specials": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|image_pad|>x<|vision_start|> <|im_end|>",
    "near_specials": "<|im_start <|image_pad| <im_end> <|IM_END|> <<|im_end|>>",
    "whitespace_runs": "a  b   c\t\td \r\n e\n\n\n  f   \n\t \r\n   x\r\r\n" + " " * 40 + "y" + "\n" * 9 + "\t" * 5,
    "nfc": "Caf\u00e9 r\u00e9sum\u00e9 \u00c5 \u00f1o",
    "nfd": "Cafe\u0301 re\u0301sume\u0301 \u212b A\u030a n\u0303o <|im_end|>\u0338",
    "code": 'def f(x):\n\treturn {"a": x ** 2}  # comment\n\nif __name__ == "__main__":\n    print(f(3))\r\n',
    "mixed_scripts": "Qwen是一个LLM模型, version 7B \u2014 مرحبا Привет こんにちは 안녕하세요 123.45%",
    "empty": "",
}
# Added tokens the published files mark non-special: transformers' split_special_tokens=True still turns their
# text into their ids; encode_text keeps them as text.
NON_SPECIAL_TYPED = "call <tool_call>{}</tool_call> <|fim_prefix|>a<|fim_suffix|> <think>hm</think> <tool_response>"


@pytest.fixture(scope="module", params=["qwen2.5-tiny", "qwen3-tiny", "qwen2.5-real"])
def case(request):
    """A folder, its family's added tokens, and QWenTokenizer (`v1`) on the qwen.tiktoken its BPE was built from."""
    folder, added, v1 = {
        "qwen2.5-tiny": ("llm_tiny_qwen2_5_dir", QWEN2_5_ADDED_TOKENS, "tok_tiny"),
        "qwen3-tiny": ("llm_tiny_qwen3_dir", QWEN3_ADDED_TOKENS, "tok_tiny"),
        "qwen2.5-real": ("llm_real_qwen2_5_tokenizer_dir", QWEN2_5_ADDED_TOKENS, "tok_real"),
    }[request.param]
    return SimpleNamespace(folder=request.getfixturevalue(folder), added=added, v1=request.getfixturevalue(v1))


@pytest.fixture(scope="module")
def ours(case):
    return Qwen2Tokenizer.from_pretrained(case.folder)


@pytest.fixture(scope="module")
def hf(case):
    return AutoTokenizer.from_pretrained(case.folder)


@pytest.mark.parametrize("name", list(CORPUS))
def test_encode_text_equals_transformers_split_special_tokens(ours, hf, name):
    text = CORPUS[name]
    assert ours.encode_text(text) == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("name", list(CORPUS))
def test_encode_text_equals_qwen7b_tokenizer_on_the_same_ranks(ours, case, name):
    """The BPE is Qwen-7B's: ids of ordinary text (specials kept as text) equal QWenTokenizer's."""
    text = CORPUS[name]
    assert ours.encode_text(text) == case.v1.encode(text, allowed_special=set())


def test_typed_added_tokens_stay_text_even_where_transformers_makes_them_ids(ours, hf, case):
    ids = ours.encode_text(NON_SPECIAL_TYPED)
    assert ids == case.v1.encode(NON_SPECIAL_TYPED, allowed_special=set())
    assert not set(ids) & ours.special_ids
    as_hf = hf(NON_SPECIAL_TYPED, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert set(as_hf) & ours.special_ids  # the documented difference: <tool_call> etc. become added ids there


def test_no_added_token_from_any_typed_text(ours):
    every_added = " ".join(token for token, _ in QWEN3_ADDED_TOKENS) + "".join(t for t, _ in QWEN3_ADDED_TOKENS)
    ids = ours.encode_text(every_added)
    assert not set(ids) & ours.special_ids
    assert ours.decode(ids) == every_added


@pytest.mark.parametrize("name", list(CORPUS))
def test_decode_equals_transformers(ours, hf, name):
    ids = hf(CORPUS[name], add_special_tokens=False)["input_ids"]  # with special ids where the text has them
    for cut in {len(ids), len(ids) // 2, len(ids) // 3 + 1}:  # cuts may split a character's bytes
        for skip in (False, True):
            assert ours.decode(ids[:cut], skip_special_tokens=skip) == hf.decode(ids[:cut], skip_special_tokens=skip)


def test_decode_round_trips_nfc_text(ours):
    for text in CORPUS.values():
        assert ours.decode(ours.encode_text(text)) == unicodedata.normalize("NFC", text)


def test_decode_skips_what_the_file_marks_special(ours, hf):
    added = sorted(ours.special_ids)
    ids = [*ours.encode_text("a"), *added, *ours.encode_text("b")]
    kept = ours.decode(ids, skip_special_tokens=True)
    assert kept == hf.decode(ids, skip_special_tokens=True)
    assert kept.startswith("a<tool_call></tool_call><|fim_prefix|>") and kept.endswith("b")
    assert "<|im_end|>" not in kept and "<|image_pad|>" not in kept
    assert ours.decode(ids) == hf.decode(ids)


def test_decode_takes_lists_tensors_arrays_and_ints(ours):
    ids = ours.encode_text("Hello, 世界") + [IM_END]
    text = ours.decode(ids)
    assert ours.decode(torch.tensor(ids)) == ours.decode(np.array(ids)) == ours.decode(tuple(ids)) == text
    assert ours.decode(IM_END) == "<|im_end|>"
    assert ours.batch_decode(torch.tensor([ids, ids])) == [text, text]
    assert ours.batch_decode([ids[:2], ids], skip_special_tokens=True) == [ours.decode(ids[:2]), text[:-10]]


def test_decode_refuses_ids_the_tokenizer_lacks(ours):
    for bad in (151700, 152063, -1):  # padding rows of the embedding; not an id
        with pytest.raises(ValueError, match=f"token id {bad} is not in the tokenizer"):
            ours.decode([*ours.encode_text("x"), bad])


def test_ids_and_sizes(ours, hf, case):
    assert (ours.eod_id, ours.im_start_id, ours.im_end_id) == (EOD, IM_START, IM_END)
    assert ours.pad_token_id == EOD == hf.pad_token_id
    assert (ours.image_token, ours.image_token_id) == ("<|image_pad|>", IMAGE_PAD)
    assert hf.convert_tokens_to_ids(ours.image_token) == IMAGE_PAD
    assert ours.stop_token_ids == [IM_END, IM_START, EOD]
    assert ours.special_ids == frozenset(range(EOD, EOD + len(case.added)))
    assert [hf.convert_ids_to_tokens(i) for i in sorted(ours.special_ids)] == [token for token, _ in case.added]
    assert len(ours) == ours.vocab_size == len(hf) == len(case.v1.mergeable_ranks) + len(case.added)
    assert ours.name_or_path == str(case.folder)


def test_answer_token_ids(ours, case):
    answer = ours.answer_token_ids()
    ordinary = len(case.v1.mergeable_ranks)
    assert answer == [*range(ordinary), IM_END, IM_START, EOD]  # the ranks are ids 0..n-1
    assert IMAGE_PAD not in answer and max(answer) < EOD + 3


def test_real_vocabulary_sizes(llm_real_qwen2_5_tokenizer_dir):
    tok = Qwen2Tokenizer.from_pretrained(llm_real_qwen2_5_tokenizer_dir)
    assert len(tok) == 151665  # transformers' len() of the published Qwen2.5 tokenizer
    assert len(tok.answer_token_ids()) == 151643 + 3


def test_pickle_rebuilds_the_tokenizer(ours):
    state = ours.__getstate__()
    assert set(state) == {"_text", "_source", "name_or_path"}  # no Rust object
    copy = pickle.loads(pickle.dumps(ours))
    for text in CORPUS.values():
        assert copy.encode_text(text) == ours.encode_text(text)
    assert copy.special_ids == ours.special_ids and copy.name_or_path == ours.name_or_path
    assert copy.decode([IM_END, *copy.encode_text("x")], skip_special_tokens=True) == "x"


# --------------------------------------------------------------------------------------------------
# The chat templates, applied by transformers, against prompts built by hand from encode_text + special ids
# --------------------------------------------------------------------------------------------------


def _hand_built(tok: Qwen2Tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """<|im_start|>{role}\\n{content}<|im_end|>\\n per turn, then <|im_start|>assistant\\n."""
    ids: list[int] = []
    for role, content in turns:
        ids += [tok.im_start_id, *tok.encode_text(f"{role}\n{content}"), tok.im_end_id, *tok.encode_text("\n")]
    return [*ids, tok.im_start_id, *tok.encode_text("assistant\n")]


def _template_ids(hf, messages, **kwargs) -> list[int]:
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)["input_ids"])


SYSTEM = 'You are a "test" assistant.\nAnswer briefly; 简短回答 🙂'
QUERY = "What is in this picture?\n  Describe it, then 总结.\n\n"


@pytest.mark.parametrize("folder", ["llm_tiny_qwen2_5_dir", "llm_tiny_qwen3_dir", "llm_real_qwen2_5_tokenizer_dir"])
def test_chat_template_system_and_user(request, folder):
    folder = request.getfixturevalue(folder)
    tok, hf = Qwen2Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUERY}]
    assert _template_ids(hf, messages) == _hand_built(tok, [("system", SYSTEM), ("user", QUERY)])


def test_chat_template_turns_typed_markers_into_ids_and_hand_built_prompts_do_not(llm_tiny_qwen2_5_dir):
    """Why prompts are built from encode_text: the template's output is a string, whose typed markers become ids."""
    tok, hf = Qwen2Tokenizer.from_pretrained(llm_tiny_qwen2_5_dir), AutoTokenizer.from_pretrained(llm_tiny_qwen2_5_dir)
    typed = "a <|image_pad|> b <|im_end|>"
    hand_built = _hand_built(tok, [("system", SYSTEM), ("user", typed)])
    template_ids = _template_ids(hf, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": typed}])
    assert IMAGE_PAD in template_ids and IMAGE_PAD not in hand_built
    assert hand_built.count(IM_END) == 2 and template_ids.count(IM_END) == 3


def test_qwen2_5_template_default_system(llm_tiny_qwen2_5_dir):
    tok, hf = Qwen2Tokenizer.from_pretrained(llm_tiny_qwen2_5_dir), AutoTokenizer.from_pretrained(llm_tiny_qwen2_5_dir)
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    expected = _hand_built(tok, [("system", default), ("user", "hi")])
    assert _template_ids(hf, [{"role": "user", "content": "hi"}]) == expected


def test_qwen3_template_no_default_system_and_thinking_switch(llm_tiny_qwen3_dir):
    tok, hf = Qwen2Tokenizer.from_pretrained(llm_tiny_qwen3_dir), AutoTokenizer.from_pretrained(llm_tiny_qwen3_dir)
    user = [{"role": "user", "content": "hi"}]
    assert _template_ids(hf, user) == _hand_built(tok, [("user", "hi")])
    assert _template_ids(hf, user, enable_thinking=True) == _hand_built(tok, [("user", "hi")])
    empty_thought = [THINK, *tok.encode_text("\n\n"), END_THINK, *tok.encode_text("\n\n")]
    assert _template_ids(hf, user, enable_thinking=False) == _hand_built(tok, [("user", "hi")]) + empty_thought


def test_chat_templates_render_history_tools_and_reasoning(llm_tiny_qwen2_5_dir, llm_tiny_qwen3_dir):
    """The published templates' behaviour on a multi-turn conversation with a tool call and tool responses."""
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>r2</think>a2",
         "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "out"},
        {"role": "tool", "content": "out2"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    tools_block = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        'function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": '
        '"f"}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call><|im_end|>\n"
    )
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
    responses = ("<|im_start|>user\n<tool_response>\nout\n</tool_response>\n"
                 "<tool_response>\nout2\n</tool_response><|im_end|>\n")
    qwen2_5 = AutoTokenizer.from_pretrained(llm_tiny_qwen2_5_dir)
    assert qwen2_5.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n" + tools_block
        + "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>\n"
        + "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>r2</think>a2\n" + call + responses
        + "<|im_start|>assistant\n"
    )
    qwen3 = AutoTokenizer.from_pretrained(llm_tiny_qwen3_dir)
    assert qwen3.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n" + tools_block
        + "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"  # reasoning before the query dropped
        + "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2\n" + call + responses
        + "<|im_start|>assistant\n"
    )
    no_tools = [{"role": "system", "content": "S"}, *messages[:2]]
    assert qwen3.apply_chat_template(no_tools, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr1\n</think>\n\na1<|im_end|>\n"  # the last message keeps its reasoning
    )


# --------------------------------------------------------------------------------------------------
# Bad folders: one line naming the folder and what is wrong
# --------------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Qwen2Tokenizer.from_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e)


def test_qwen7b_folder_is_named_as_such(tiny_llm_dir):
    with pytest.raises(FileNotFoundError) as e:
        Qwen2Tokenizer.from_pretrained(tiny_llm_dir)
    message = _one_line(e)
    assert str(tiny_llm_dir) in message and "qwen.tiktoken" in message and "QWenTokenizer" in message


def test_vocab_and_merges_without_tokenizer_json(tmp_path, llm_tiny_qwen2_5_dir):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(llm_tiny_qwen2_5_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError) as e:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    message = _one_line(e)
    assert str(tmp_path) in message and "tokenizer.json" in message and "vocab.json" in message


def test_broken_tokenizer_json(tmp_path, llm_tiny_qwen2_5_dir):
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in _one_line(e)

    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}', encoding="utf-8")
    with pytest.raises(ValueError, match="not hold a BPE tokenizer") as e:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    _one_line(e)


def test_tokenizer_without_image_pad_is_refused(tmp_path, llm_tiny_qwen2_5_dir):
    """A tokenizer.json that lacks a token this class hands out (here: Qwen-7B's, from our llava export)."""
    content = json.loads((llm_tiny_qwen2_5_dir / "tokenizer.json").read_text(encoding="utf-8"))
    content["added_tokens"] = [t for t in content["added_tokens"] if t["content"] != "<|image_pad|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape("no added token <|image_pad|>")) as e:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in _one_line(e)


def test_encode_text_takes_one_str(ours):
    with pytest.raises(TypeError, match="one str"):
        ours.encode_text(["a", "b"])
