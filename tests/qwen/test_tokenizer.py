"""QWenTokenizer against an independent tiktoken reference built here, and the tiny vocabulary builder."""

from __future__ import annotations

import json
import os
import pickle
import unicodedata

import numpy as np
import pytest
import torch

from qwen.tiny_vocab import (
    DEFAULT_CORPUS,
    DEFAULT_VOCAB_SIZE,
    train_bpe,
    write_tiktoken_file,
    write_tiny_vocab,
)
from qwen.tokenization_qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenTokenizer

EOD, IM_START, IM_END, EXTRA_0, EXTRA_204 = 151643, 151644, 151645, 151646, 151850

TEXTS = {
    "english": "Hello, world! It's a test: we'll see what they've done; I'M sure you'd LIKE it. Don't.",
    "chinese": "这是什么？图片的左上角有一个红色的圆形。今天天气很好，我们去公园散步吧！",
    "code": 'def f(x):\n\treturn {"a": x ** 2}  # comment\n\nif __name__ == "__main__":\n    print(f(3))\n',
    "emoji": "I \u2764\ufe0f \U0001f99c and \U0001f469\u200d\U0001f469\u200d\U0001f467 family \U0001f1e8\U0001f1f3!",
    "whitespace": "a  b   c\t\td \r\n e\n\n\n  f   \n\t \r\n   x\r\r\n",
    "trailing_spaces": "end   ",
    "long_spaces": " " * 100 + "x" + "\t" * 7,
    "mixed_scripts": "Qwen是一个LLM模型, version 7B (七十亿参数) \u2014 مرحبا Привет こんにちは 안녕하세요 123.45%",
    "numbers": "3.14159 2024-01-01 1,000,000 \u0661\u0662\u0663 12345678901234567890",
    "combining": "Cafe\u0301 re\u0301sume\u0301 \u212b A\u030a \u1100\u1161\u11a8 n\u0303o",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|extra_0|>x<|extra_204|>",
    "near_specials": "<|im_start <|extra_205|> <|endoftext| <im_end> <|IM_START|>",
    "control": "\x00\x01\x7f\u200b\ufeff tab\there",
    "empty": "",
}


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# ------------------------------------------------------------------------------------------------
# Parity with the reference on the real vocabulary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_matches_reference_default_allows_specials(tok_real, tok_real_reference, name):
    text = TEXTS[name]
    expected = tok_real_reference.encode(_nfc(text), allowed_special="all", disallowed_special=())
    assert tok_real.encode(text) == expected


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_matches_reference_specials_as_text(tok_real, tok_real_reference, name):
    text = TEXTS[name]
    expected = tok_real_reference.encode(_nfc(text), allowed_special=set(), disallowed_special=())
    ids = tok_real.encode(text, allowed_special=set())
    assert ids == expected
    assert all(i < EOD for i in ids)


@pytest.mark.parametrize("name", list(TEXTS))
def test_decode_round_trip(tok_real, name):
    text = TEXTS[name]
    assert tok_real.decode(tok_real.encode(text)) == _nfc(text)
    assert tok_real.decode(tok_real.encode(text, allowed_special=set())) == _nfc(text)


def test_nfc_normalisation_changes_ids(tok_real, tok_real_reference):
    text = TEXTS["combining"]
    assert _nfc(text) != text
    assert tok_real.encode(text) == tok_real.encode(_nfc(text))
    assert tok_real.encode(text) != tok_real_reference.encode(text, disallowed_special=())
    assert tok_real.encode("e\u0301") == tok_real.encode("\u00e9")


def test_hand_checked_ids(tok_real):
    # Values fixed by the official vocabulary (the same ranks as Qwen2's first 151643).
    assert tok_real.encode("\n") == [198]
    assert tok_real.encode("system") == [8948]
    assert tok_real.encode("user") == [872]
    assert tok_real.encode("assistant") == [77091]
    assert tok_real.encode("12345") == [16, 17, 18, 19, 20]  # digits are always single tokens
    assert tok_real.encode("<|im_start|><|im_end|><|endoftext|>") == [IM_START, IM_END, EOD]


def test_special_text_with_allowed_empty_is_ordinary_text(tok_real):
    ids = tok_real.encode("<|im_end|>", allowed_special=set())
    assert len(ids) > 1
    assert all(i < EOD for i in ids)
    assert tok_real.decode(ids) == "<|im_end|>"


def test_special_token_arguments_follow_tiktoken(tok_real, tok_real_reference):
    text = "a<|im_start|>b<|im_end|>c"
    ref = tok_real_reference

    def ref_encode(**kwargs):
        return ref.encode(text, **kwargs)

    # Only some specials allowed: <|im_start|> becomes its id, <|im_end|> stays text.
    ids = tok_real.encode(text, allowed_special={"<|im_start|>"})
    assert ids == ref_encode(allowed_special={"<|im_start|>"}, disallowed_special=())
    assert IM_START in ids and IM_END not in ids
    # Other collections work like sets.
    assert tok_real.encode(text, allowed_special=["<|im_start|>"]) == ids
    assert tok_real.encode(text, allowed_special=("<|im_start|>",)) == ids
    # Disallowed and present: ValueError, even when the same token is also allowed.
    with pytest.raises(ValueError, match="im_start"):
        tok_real.encode(text, allowed_special=set(), disallowed_special="all")
    with pytest.raises(ValueError, match="im_end"):
        tok_real.encode(text, disallowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match="im_end"):
        tok_real.encode(text, allowed_special="all", disallowed_special=["<|im_end|>"])
    # Disallowed but absent: fine.
    assert tok_real.encode(text, disallowed_special={"<|extra_3|>"}) == ref_encode(allowed_special="all")
    # disallowed_special="all" means "all that are not allowed": with the default allowed="all", nothing raises.
    assert tok_real.encode(text, disallowed_special="all") == [64, IM_START, 65, IM_END, 66]
    with pytest.raises(ValueError, match="allowed_special"):
        tok_real.encode(text, allowed_special="<|im_start|>")


def test_special_token_ids_and_attributes(tok_real):
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    assert tok_real.special_tokens == {n: 151643 + i for i, n in enumerate(names)}
    for name, i in tok_real.special_tokens.items():
        assert tok_real.encode(name) == [i]
        assert tok_real.decode([i]) == name
    assert (tok_real.eod_id, tok_real.im_start_id, tok_real.im_end_id) == (EOD, IM_START, IM_END)
    assert tok_real.pad_token_id == tok_real.eos_token_id == EOD
    assert IMAGE_TAG == "<|extra_0|>" and IMAGE_TOKEN_ID == 151646
    assert tok_real.image_token_id == EXTRA_0
    assert tok_real.special_tokens["<|extra_204|>"] == EXTRA_204
    assert len(tok_real) == tok_real.vocab_size == tok_real.n_vocab == 151851


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def test_decode_split_multibyte_character(tok_real):
    ids = tok_real.encode("\U0001f99c")  # 4 UTF-8 bytes, more than one token
    assert len(ids) >= 2
    assert "\ufffd" in tok_real.decode(ids[:1])
    assert tok_real.decode(ids[:1], errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        tok_real.decode(ids[:1], errors="strict")
    assert tok_real.decode(ids) == "\U0001f99c"


def test_decode_errors_default_comes_from_constructor(tok_tiny_vocab_file):
    quiet = QWenTokenizer(tok_tiny_vocab_file, errors="ignore")
    first_byte = quiet.encode("\U0001f99c")[:1]
    assert quiet.decode(first_byte) == ""
    assert "\ufffd" in quiet.decode(first_byte, errors="replace")


def test_decode_skip_special_tokens(tok_real):
    ids = tok_real.encode("<|im_start|>user\nhi<|im_end|><|extra_7|><|endoftext|>")
    assert tok_real.decode(ids) == "<|im_start|>user\nhi<|im_end|><|extra_7|><|endoftext|>"
    assert tok_real.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_decode_accepts_int_list_tensor_array_and_streamer_kwargs(tok_real):
    ids = tok_real.encode("Hello 世界")
    text = "Hello 世界"
    assert tok_real.decode(ids) == text
    assert tok_real.decode(torch.tensor(ids)) == text
    assert tok_real.decode(np.array(ids)) == text
    assert tok_real.decode([np.int64(i) for i in ids]) == text
    assert tok_real.decode(ids[0]) == tok_real.decode(ids[:1])
    assert tok_real.decode(torch.tensor(ids[0])) == tok_real.decode(ids[:1])
    assert tok_real.decode(ids, clean_up_tokenization_spaces=True) == text
    assert tok_real.batch_decode(torch.tensor([ids, ids])) == [text, text]
    assert tok_real.batch_decode([ids, [EOD, *ids]], skip_special_tokens=True) == [text, text]
    with pytest.raises(TypeError, match="batch_decode"):
        tok_real.decode([ids, ids])


def test_decode_unknown_id_names_it(tok_real, tok_tiny):
    with pytest.raises(ValueError, match="151900"):
        tok_real.decode([1, 151900])
    gap = len(tok_tiny.mergeable_ranks) + 5  # between the last rank and 151643: no token there
    with pytest.raises(ValueError, match=str(gap)):
        tok_tiny.decode([gap])


def test_text_iterator_streamer_reassembles_the_text(tok_real):
    from transformers import TextIteratorStreamer

    text = "图片里有一个红色的圆形 \U0001f99c and a blue square.\nDone."
    streamer = TextIteratorStreamer(tok_real, skip_special_tokens=True)
    for i in [*tok_real.encode(text), EOD]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer) == text


def test_tokenize_and_token_id_conversions(tok_real):
    tokens = tok_real.tokenize("Hi<|im_end|> 世界")
    assert tokens[0] == b"Hi" and tokens[1] == "<|im_end|>"
    assert all(isinstance(t, bytes) for t in tokens[2:])
    ids = tok_real.convert_tokens_to_ids(tokens)
    assert ids == tok_real.encode("Hi<|im_end|> 世界")
    assert tok_real.convert_ids_to_tokens(ids) == tokens
    assert tok_real.convert_ids_to_tokens(IM_START) == "<|im_start|>"
    assert tok_real.convert_ids_to_tokens(ids, skip_special_tokens=True) == [tokens[0], *tokens[2:]]
    assert tok_real.convert_tokens_to_ids(b"\n") == 198
    assert tok_real.convert_tokens_to_ids("<|endoftext|>") == EOD
    assert tok_real.convert_tokens_to_ids(b"\xff\xfe not a token") is None
    assert tok_real.convert_tokens_to_string(tokens) == "Hi<|im_end|> 世界"
    assert tok_real.tokenize("<|im_end|>", allowed_special=set()) == [
        tok_real.decoder[i] for i in tok_real.encode("<|im_end|>", allowed_special=set())
    ]


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def test_call_pads_right_and_left_with_mask_from_lengths(tok_real):
    texts = ["a b c<|endoftext|>", "a"]  # the first ends with a real <|endoftext|>, the pad id
    long, short = (tok_real.encode(t) for t in texts)
    assert long[-1] == EOD and len(long) > len(short)
    pad = [EOD] * (len(long) - len(short))

    right = tok_real(texts, padding=True, return_tensors="pt")
    assert right["input_ids"].tolist() == [long, short + pad]
    assert right["attention_mask"].tolist() == [[1] * len(long), [1] * len(short) + [0] * len(pad)]
    assert right["input_ids"].dtype == torch.long and right["attention_mask"].dtype == torch.long

    left = tok_real(texts, padding="longest", padding_side="left", return_tensors="pt")
    assert left.input_ids.tolist() == [long, pad + short]
    assert left.attention_mask.tolist() == [[1] * len(long), [0] * len(pad) + [1] * len(short)]


def test_call_variants(tok_real):
    ids = tok_real.encode("hello world")
    single = tok_real("hello world")
    assert single == {"input_ids": ids, "attention_mask": [1] * len(ids)}
    assert tok_real("hello world", return_tensors="pt")["input_ids"].shape == (1, len(ids))
    unpadded = tok_real(["hello world", "hi"])
    assert unpadded["input_ids"] == [ids, tok_real.encode("hi")]
    with pytest.raises(ValueError, match="padding"):
        tok_real(["hello world", "hi"], return_tensors="pt")
    fixed = tok_real(["hello world", "hi"], padding="max_length", max_length=6)
    assert [len(r) for r in fixed["input_ids"]] == [6, 6]
    assert fixed["attention_mask"][1] == [1] + [0] * 5
    cut = tok_real(["hello world again", "hi"], truncation=True, max_length=2, padding=True)
    assert cut["input_ids"] == [tok_real.encode("hello world again")[:2], [tok_real.encode("hi")[0], EOD]]
    assert cut["attention_mask"] == [[1, 1], [1, 0]]
    as_text = tok_real(["<|im_end|>"], allowed_special=set())
    assert as_text["input_ids"] == [tok_real.encode("<|im_end|>", allowed_special=set())]
    with pytest.raises(ValueError, match="im_end"):
        tok_real("<|im_end|>", allowed_special=set(), disallowed_special="all")
    batch = tok_real(["a", "b c"], padding=True, return_tensors="pt").to("cpu")
    assert set(batch) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="padding_side"):
        tok_real(["a"], padding=True, padding_side="middle")


# ------------------------------------------------------------------------------------------------
# Loading, saving, errors
# ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tok_tiny, tok_tiny_vocab_file, tmp_path):
    vocab_out, config_out = tok_tiny.save_pretrained(tmp_path / "saved")
    with open(vocab_out, "rb") as a, open(tok_tiny_vocab_file, "rb") as b:
        assert a.read() == b.read()
    with open(config_out, encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["model_max_length"] == 8192
    loaded = QWenTokenizer.from_pretrained(tmp_path / "saved")
    text = TEXTS["mixed_scripts"] + TEXTS["specials"]
    assert loaded.encode(text) == tok_tiny.encode(text)
    assert loaded.mergeable_ranks == tok_tiny.mergeable_ranks
    # Saving into the folder it was loaded from leaves the vocabulary intact.
    loaded.save_pretrained(tmp_path / "saved")
    assert QWenTokenizer.from_pretrained(tmp_path / "saved").mergeable_ranks == tok_tiny.mergeable_ranks


def test_pickle_round_trip(tok_tiny):
    clone = pickle.loads(pickle.dumps(tok_tiny))
    assert clone.encode(TEXTS["chinese"]) == tok_tiny.encode(TEXTS["chinese"])
    assert clone.decode(clone.encode("<|im_start|>x")) == "<|im_start|>x"


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir.*qwen.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*qwen\.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        QWenTokenizer(tmp_path / "missing.tiktoken")


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        (b"not-base64!! 2", "cannot parse"),
        (b"Ig== two", "cannot parse"),
        (b"Ig==", "expected 'base64"),
        (b"IQ== 2", "already has rank"),
        (b"Iw== 1", "rank 1 appears twice"),
        (b"Iw== 151643", "special tokens"),
    ],
)
def test_malformed_vocab_line_names_file_and_line(tmp_path, third_line, message):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(b"IQ== 0\nIg== 1\n" + third_line + b"\n")
    with pytest.raises(ValueError, match=rf"bad\.tiktoken, line 3: .*{message}"):
        QWenTokenizer(path)


# ------------------------------------------------------------------------------------------------
# The tiny vocabulary
# ------------------------------------------------------------------------------------------------


def test_tiny_vocab_is_deterministic(tmp_path):
    a = write_tiny_vocab(tmp_path / "a.tiktoken")
    b = write_tiny_vocab(tmp_path / "b.tiktoken")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    (tmp_path / "folder").mkdir()
    assert write_tiny_vocab(tmp_path / "folder") == os.path.join(tmp_path / "folder", "qwen.tiktoken")


def test_tiny_vocab_is_a_valid_bpe():
    import tiktoken._educational

    ranks = train_bpe(DEFAULT_CORPUS, DEFAULT_VOCAB_SIZE)
    assert len(ranks) == DEFAULT_VOCAB_SIZE
    assert sorted(ranks.values()) == list(range(DEFAULT_VOCAB_SIZE))
    assert all(ranks[bytes([b])] == b for b in range(256))
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        # made of two earlier tokens, and tiktoken's own merge loop reaches exactly this token
        assert any(ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank
                   for k in range(1, len(token)))
        assert tiktoken._educational.bpe_encode(ranks, token, visualise=None) == [rank]


@pytest.mark.parametrize("size", [256, 300, 777])
def test_tiny_vocab_size_as_requested(size):
    ranks = train_bpe(DEFAULT_CORPUS, size)
    assert sorted(ranks.values()) == list(range(size))


def test_tiny_vocab_rejects_impossible_sizes(tmp_path):
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(DEFAULT_CORPUS, 255)
    with pytest.raises(ValueError, match="only supports"):
        train_bpe("tiny corpus", 1000)
    with pytest.raises(ValueError, match="contiguous"):
        write_tiktoken_file({b"a": 0, b"b": 2}, tmp_path / "x.tiktoken")


def test_tiny_tokenizer_matches_reference_and_round_trips(tok_tiny, tok_tiny_vocab_file, tok_make_reference):
    reference = tok_make_reference(tok_tiny_vocab_file)
    unseen = "Ünïcödé \U0001f600\U0001f99c 鳄鱼 ∑∫ Ελληνικά עברית \x00 \r\n\t end"
    for text in [*TEXTS.values(), unseen]:
        ids = tok_tiny.encode(text)
        assert ids == reference.encode(_nfc(text), allowed_special="all", disallowed_special=())
        assert tok_tiny.decode(ids) == _nfc(text)
    assert len(tok_tiny.mergeable_ranks) == DEFAULT_VOCAB_SIZE
    assert len(tok_tiny) == DEFAULT_VOCAB_SIZE + 208
    assert tok_tiny.n_vocab == 151851


def test_tiny_tokenizer_keeps_special_ids(tok_tiny):
    assert tok_tiny.encode("<|endoftext|><|im_start|><|im_end|><|extra_0|><|extra_204|>") == [
        EOD, IM_START, IM_END, EXTRA_0, EXTRA_204
    ]
    assert (tok_tiny.eod_id, tok_tiny.im_start_id, tok_tiny.im_end_id, tok_tiny.image_token_id) == (
        EOD, IM_START, IM_END, EXTRA_0
    )
    assert all(i < len(tok_tiny.mergeable_ranks) for i in tok_tiny.encode("<|im_end|>", allowed_special=set()))
