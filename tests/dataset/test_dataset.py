"""dataset/: ChatML encoding and label masks built by hand, truncation properties, the dataset over a
JSONL file with real image files, the collator, and the preflight command run as a subprocess."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.conversation import (
    IGNORE_INDEX,
    SampleTooLongError,
    build_prompt_ids,
    check_encoding,
    encode_conversation,
    encode_user_text,
)
from dataset.dataset import DataCollator, SupervisedDataset, candidate_choice
from dataset.preflight import main as preflight_main
from dataset.preflight import render
from qwen.chat_format import make_context

EOD, IM_START, IM_END, IMG = 151643, 151644, 151645, 151646
NL = 198  # "\n" in the real vocabulary
SYSTEM, USER, ASSISTANT = 8948, 872, 77091  # "system", "user", "assistant" in the real vocabulary
SYS_PROMPT = "You are a helpful assistant."
TAG = "<image>"  # the image marker of processed samples (dataprocess.schema.IMAGE_MARKER)
REPO = Path(__file__).resolve().parents[2]


def text(tok, s):
    return tok.encode(s, allowed_special=set())


def encode(tok, turns, n=4, max_length=None, system=SYS_PROMPT):
    return encode_conversation(tok, turns, system=system, num_image_tokens=n, max_length=max_length)


def conv(*contents):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


def runs(ids, token=IMG):
    """(start, length) of each maximal run of `token`."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


# --------------------------------------------------------------------------------------------------
# Encoding by hand (real vocabulary)
# --------------------------------------------------------------------------------------------------


def test_label_mask_by_hand(tok_real):
    turns = conv(f"{TAG}\nWhat is in the picture?", "A red circle.", "Is it big?", "No, it is small.")
    enc = encode(tok_real, turns, n=3)

    # (id, supervised) pairs, written out from the ChatML layout
    def plain(ids):
        return [(i, False) for i in ids]

    def answer(ids):
        return [(i, True) for i in ids]

    expected = (
        plain([IM_START, SYSTEM, NL, *text(tok_real, SYS_PROMPT), IM_END])
        + plain([NL, IM_START, USER, NL, IMG, IMG, IMG, *text(tok_real, "\nWhat is in the picture?"), IM_END])
        + plain([NL, IM_START, ASSISTANT, NL]) + answer([*text(tok_real, "A red circle."), IM_END])
        + plain([NL, IM_START, USER, NL, *text(tok_real, "Is it big?"), IM_END])
        + plain([NL, IM_START, ASSISTANT, NL]) + answer([*text(tok_real, "No, it is small."), IM_END])
    )
    assert enc.input_ids == [i for i, _ in expected]
    assert enc.labels == [i if sup else IGNORE_INDEX for i, sup in expected]
    assert (enc.num_images, enc.dropped_turns) == (1, 0)
    # the supervised tokens, decoded, are exactly the two answers and their <|im_end|>
    supervised = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok_real.decode(supervised) == "A red circle.<|im_end|>No, it is small.<|im_end|>"
    assert render(tok_real, enc.input_ids, enc.labels, 3) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image×3>\n"
        "What is in the picture?<|im_end|>\n<|im_start|>assistant\n⟦A red circle.<|im_end|>⟧\n"
        "<|im_start|>user\nIs it big?<|im_end|>\n<|im_start|>assistant\n⟦No, it is small.<|im_end|>⟧"
    )


@pytest.mark.parametrize("history", [
    [],
    [("What color is the circle?", "The circle is red.")],
    [("What color is the circle?", "The circle is red."), ("那个正方形呢？", "正方形是绿色的。")],
    [("<|im_end|> tricky <|endoftext|>", "answer with <|im_start|> text"), ("a", "b"), ("c\n", "\nd")],
])
@pytest.mark.parametrize("system", ["", SYS_PROMPT])
def test_prompt_equals_make_context(tok_real, history, system):
    query = "Where is the blue triangle?"
    expected = make_context(tok_real, query, history=history, system=system)[1]
    assert build_prompt_ids(tok_real, query, history, system, 256) == expected
    # the same window rule as make_context when asked for
    for window in (10, 30, 60):
        assert (build_prompt_ids(tok_real, query, history, system, 256, max_window_size=window)
                == make_context(tok_real, query, history=history, system=system, max_window_size=window)[1])


def test_training_prefix_equals_prompt(tok_real):
    turns = conv(f"{TAG}{TAG} compare these", "The left one.", "And now?", "Both.", f"last {TAG} one", "A cat.")
    n = 5
    enc = encode(tok_real, turns, n=n)
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    for k, (query, answer) in enumerate(pairs):
        prompt = build_prompt_ids(tok_real, query, pairs[:k], SYS_PROMPT, n)
        assert enc.input_ids[: len(prompt)] == prompt
        # earlier answers keep their labels; the new user turn and the assistant header are unsupervised
        history_labels = encode(tok_real, turns[: 2 * k], n=n).labels if k else []
        assert len(history_labels) < len(prompt)
        assert enc.labels[: len(prompt)] == history_labels + [IGNORE_INDEX] * (len(prompt) - len(history_labels))
        # the answer follows, supervised, with its <|im_end|>
        ans = text(tok_real, answer) + [IM_END]
        assert enc.input_ids[len(prompt): len(prompt) + len(ans)] == ans
        assert enc.labels[len(prompt): len(prompt) + len(ans)] == ans
    assert enc.num_images == 3


def test_encode_user_text(tok_real):
    for s in ["Hello <|im_end|> world <|endoftext|> <|extra_1|>", "plain text", "", "  \n\n x"]:
        assert encode_user_text(tok_real, s, 7) == text(tok_real, s)
    assert max(encode_user_text(tok_real, "a <|im_end|><|im_start|>", 7)) < EOD
    ids = encode_user_text(tok_real, f"before{TAG}after{TAG}", 2)
    assert ids == [*text(tok_real, "before"), IMG, IMG, *text(tok_real, "after"), IMG, IMG]
    with pytest.raises(ValueError, match="num_image_tokens"):
        encode_user_text(tok_real, TAG, 0)


def test_special_looking_text_stays_text(tok_real):
    answer = f"Type {TAG} or <|im_end|> or <|endoftext|><|im_start|>assistant to break it."
    user = "Is <|im_end|> special? <|im_start|>system <|extra_0|>"  # the LLM's image token typed: text too
    enc = encode(tok_real, conv(user, answer))
    assert enc.num_images == 0  # a tag in an answer is text, not an image
    answer_ids = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert answer_ids == text(tok_real, answer) + [IM_END]
    assert max(answer_ids[:-1]) < EOD
    assert tok_real.decode(answer_ids[:-1]) == answer
    # specials only where the layout puts them: 3 messages
    assert enc.input_ids.count(IM_START) == 3 and enc.input_ids.count(IM_END) == 3
    assert IMG not in enc.input_ids


def test_image_placement(tok_tiny):
    n = 4
    # two images in one user turn, in order, text between them kept
    enc = encode(tok_tiny, conv(f"first {TAG} then {TAG}", "ok"), n=n)
    assert [length for _, length in runs(enc.input_ids)] == [n, n]
    (a, _), (b, _) = runs(enc.input_ids)
    assert tok_tiny.decode(enc.input_ids[a + n: b]) == " then "
    assert enc.num_images == 2
    # adjacent tags: one run of 2n, still two images
    enc = encode(tok_tiny, conv(f"{TAG}{TAG}\nsame?", "yes"), n=n)
    assert [length for _, length in runs(enc.input_ids)] == [2 * n] and enc.num_images == 2
    # images in the second user turn only
    enc = encode(tok_tiny, conv("hello", "hi", f"look {TAG}", "a circle"), n=n)
    second_user = [i for i, t in enumerate(enc.input_ids) if t == IM_START][3]
    head = 1 + len(text(tok_tiny, "user\n"))  # <|im_start|>user\n
    assert [s for s, _ in runs(enc.input_ids)] == [second_user + head + len(text(tok_tiny, "look "))]
    assert enc.num_images == 1
    # text only
    enc = encode(tok_tiny, conv("hello", "hi"), n=n)
    assert IMG not in enc.input_ids and enc.num_images == 0
    # no placeholder is ever supervised
    for e in [encode(tok_tiny, conv(f"{TAG}a", "b", f"{TAG}", f"{TAG}c"), n=n)]:
        assert all(lab != IMG for lab in e.labels)


def test_bad_turns_raise(tok_tiny):
    with pytest.raises(ValueError, match="sample-7: turn 1 is 'user', expected 'assistant'"):
        encode_conversation(tok_tiny, conv("a", "b")[:1] * 2, system="", num_image_tokens=4, max_length=None,
                            sample_id="sample-7")
    with pytest.raises(ValueError, match="ends with a 'user' turn, expected 'assistant'"):
        encode(tok_tiny, conv("a", "b", "c"))
    with pytest.raises(ValueError, match="no turns"):
        encode(tok_tiny, [])


def test_check_encoding_catches_corruption(tok_tiny):
    n = 4
    enc = encode(tok_tiny, conv(f"{TAG} what?", "A circle.", "more", "no"), n=n)
    ids, labels = enc.input_ids, enc.labels
    ok = {"num_images": 1, "num_answers": 2, "num_image_tokens": n, "sample_id": "s1"}
    check_encoding(tok_tiny, ids, labels, **ok)

    def broken(ids2, labels2, **kw):
        with pytest.raises(ValueError, match="s1: inconsistent encoding"):
            check_encoding(tok_tiny, ids2, labels2, **{**ok, **kw})

    first_ans = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    img = ids.index(IMG)
    broken(ids, labels[:-1])  # lengths differ
    broken(ids, [*labels[:first_ans - 1], ids[first_ans - 1], *labels[first_ans:]])  # "\n" of the header supervised
    broken(ids, [*labels[:first_ans], IGNORE_INDEX, *labels[first_ans + 1:]])  # answer token unsupervised
    broken(ids, [*labels[:-1], IGNORE_INDEX])  # closing <|im_end|> unsupervised
    broken(ids, [*labels[:img], IMG, *labels[img + 1:]])  # a placeholder supervised
    broken(ids[:img] + ids[img + 1:], labels[:img] + labels[img + 1:])  # a run cut short
    broken(ids, labels, num_images=2)  # image count
    broken(ids, labels, num_answers=1)  # trailing tokens
    broken(ids + [198], labels + [IGNORE_INDEX])  # text after the last message
    swapped = list(ids)
    swapped[first_ans] = IMG  # a placeholder in an answer
    broken(swapped, [*labels[:first_ans], IMG, *labels[first_ans + 1:]])
    swapped = list(ids)
    swapped[first_ans] = EOD  # a special id in an answer
    broken(swapped, [*labels[:first_ans], EOD, *labels[first_ans + 1:]])


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------

WORDS = ["the", "red", "circle", "is", "in", "top", "left", "corner", "a", "blue", "square", "green",
         "triangle", "what", "where", "why", "这是", "图片"]


def random_conversation(rng: random.Random) -> list[dict]:
    turns = []
    for _ in range(rng.randint(1, 4)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            words.insert(rng.randint(0, len(words)), TAG)
        turns.append({"role": "user", "content": " ".join(words)})
        turns.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))})
    return turns


def test_truncation_properties(tok_tiny):
    """Over many conversations and every max_length: whole trailing pairs dropped, placeholder runs whole,
    supervised tokens only in kept answers, images == tags kept; SampleTooLongError iff pair 1 does not fit."""
    rng = random.Random(0)
    n = 6
    checked = too_long = 0
    for _ in range(40):
        turns = random_conversation(rng)
        pairs = len(turns) // 2
        full = [encode(tok_tiny, turns[: 2 * k], n=n) for k in range(1, pairs + 1)]  # untruncated prefixes
        for max_length in range(len(full[0].input_ids) - 5, len(full[-1].input_ids) + 2):
            try:
                enc = encode(tok_tiny, turns, n=n, max_length=max_length)
            except SampleTooLongError as e:
                assert len(full[0].input_ids) > max_length and e.length == len(full[0].input_ids)
                too_long += 1
                continue
            kept = pairs - enc.dropped_turns // 2
            assert enc.dropped_turns % 2 == 0 and kept >= 1
            assert len(enc.input_ids) <= max_length
            # the longest prefix of whole pairs that fits, token for token
            assert enc == type(enc)(full[kept - 1].input_ids, full[kept - 1].labels, full[kept - 1].num_images,
                                    enc.dropped_turns)
            assert kept == pairs or len(full[kept].input_ids) > max_length
            # every run whole, as many images as kept tags, never supervised
            assert all(length % n == 0 for _, length in runs(enc.input_ids))
            assert sum(length for _, length in runs(enc.input_ids)) == n * enc.num_images
            assert enc.num_images == sum(t["content"].count(TAG) for t in turns[: 2 * kept : 2])
            assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(enc.labels, enc.input_ids))
            supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
            expected = [t for k in range(kept) for t in text(tok_tiny, turns[2 * k + 1]["content"]) + [IM_END]]
            assert supervised == expected
            checked += 1
    assert checked > 500 and too_long > 50


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def item(ids, labels=None, pixels=None):
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels if labels is not None else ids)}
    out["pixel_values"] = pixels
    return out


def test_collator_right_padding():
    items = [
        item([1, 2, 3], [-100, 2, 3], pixels=torch.full((2, 3, 4, 4), 0.0)),
        item([5, 6, EOD, EOD], [-100, -100, EOD, EOD]),  # ends with a real <|endoftext|>
        item([7], pixels=torch.full((1, 3, 4, 4), 2.0)),
    ]
    items[0]["pixel_values"][1] = 1.0
    batch = DataCollator(EOD)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOD], [5, 6, EOD, EOD], [7, EOD, EOD, EOD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, EOD, EOD], [7, -100, -100, -100]]
    # images of all items, item order then tag order
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long


def test_collator_left_padding_multiple_and_no_images():
    items = [item([1, 2, 3]), item([4, EOD])]
    batch = DataCollator(EOD, padding_side="left", pad_to_multiple_of=4)(items)
    assert "pixel_values" not in batch and "patch_features" not in batch
    assert batch["input_ids"].tolist() == [[EOD, 1, 2, 3], [EOD, EOD, 4, EOD]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 1, 2, 3], [-100, -100, 4, EOD]]
    batch = DataCollator(EOD, pad_to_multiple_of=8)(items)
    assert batch["input_ids"].shape == (2, 8)
    # inference items without labels
    batch = DataCollator(EOD, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert "labels" not in batch and batch["input_ids"].tolist() == [[1, 2], [EOD, 3]]
    with pytest.raises(ValueError, match="padding_side"):
        DataCollator(EOD, padding_side="middle")


# --------------------------------------------------------------------------------------------------
# Dataset over a JSONL file with real image files
# --------------------------------------------------------------------------------------------------

FAKE_SIZE = 28


def fake_processor(images):
    """A small stand-in for the CLIP processor: resize to 28x28, scale to [-1, 1]. [N, 3, 28, 28]."""
    arrays = [np.asarray(im.resize((FAKE_SIZE, FAKE_SIZE)), dtype=np.float32) / 255.0 for im in images]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.5) / 0.5


def save_image(path: Path, grey: int) -> str:
    Image.new("RGB", (40, 30), (grey, grey, grey)).save(path)
    return str(path)


def write_jsonl(path: Path, samples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def sample(sid, images, *contents, candidates=None):
    turns = conv(*contents)
    if candidates:
        turns[-1]["candidates"] = candidates
    return {"id": sid, "source": "test", "images": images, "turns": turns}


def make_dataset(path, tok, n=4, max_length=512, **kw):
    return SupervisedDataset(path, tok, fake_processor, num_image_tokens=n, system=SYS_PROMPT,
                             max_length=max_length, **kw)


def grey_of(pixels):
    """The grey level an image was saved with, from its normalised pixels."""
    return round(((pixels[:, 0, 0, 0] * 0.5 + 0.5) * 255).item()) if pixels.ndim == 4 else None


def test_dataset_items(tmp_path, tok_tiny):
    imgs = [save_image(tmp_path / f"{g}.png", g) for g in (10, 20, 30)]
    path = write_jsonl(tmp_path / "train.jsonl", [
        sample("two", imgs[:2], f"{TAG} and {TAG}: same?", "No."),
        sample("text", [], "hello", "hi there"),
        sample("later", [imgs[2]], "hello", "hi", f"what is {TAG}", "grey"),
    ])
    ds = make_dataset(path, tok_tiny)
    assert len(ds) == 3 and ds.skipped == 0 and ds.unusable == [] and ds.num_truncated == 0
    items = [ds[i] for i in range(3)]
    assert ds.lengths == [len(x["input_ids"]) for x in items]
    assert items[0]["pixel_values"].shape == (2, 3, FAKE_SIZE, FAKE_SIZE)
    assert [grey_of(items[0]["pixel_values"][i:i + 1]) for i in range(2)] == [10, 20]  # tag order
    assert items[1]["pixel_values"] is None
    assert grey_of(items[2]["pixel_values"]) == 30
    for x in items:
        assert x["input_ids"].dtype == x["labels"].dtype == torch.long
        assert (x["input_ids"] == IMG).sum() == 4 * (0 if x["pixel_values"] is None else len(x["pixel_values"]))
    # through a DataLoader with the collator: images in sample order
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=DataCollator(EOD))))
    assert batch["pixel_values"].shape[0] == 3
    assert [grey_of(batch["pixel_values"][i:i + 1]) for i in range(3)] == [10, 20, 30]
    assert (batch["input_ids"] == IMG).sum() == 3 * 4


def test_dataset_truncation_and_unusable(tmp_path, tok_tiny):
    img = save_image(tmp_path / "a.png", 50)
    long_answer = " ".join(["circle"] * 200)
    path = write_jsonl(tmp_path / "train.jsonl", [
        sample("fits", [img], f"{TAG} what?", "a circle"),
        sample("cut", [img, img], f"{TAG} what?", "a circle", f"and {TAG}?", long_answer),
        sample("too-long", [img], f"{TAG} what?", long_answer),
    ])
    ds = make_dataset(path, tok_tiny, max_length=120)
    assert len(ds) == 2 and ds.unusable == ["too-long"] and ds.num_truncated == 1
    cut = ds[1]
    assert cut["pixel_values"].shape[0] == 1  # the image of the dropped turn is dropped too
    assert (cut["input_ids"] == IMG).sum() == 4 and len(cut["input_ids"]) == ds.lengths[1] <= 120


def test_dataset_candidates_deterministic(tmp_path, tok_tiny):
    img = save_image(tmp_path / "a.png", 50)
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple line"]
    path = write_jsonl(tmp_path / "train.jsonl",
                       [sample(f"aic:{i}", [img], f"{TAG} describe", captions[0], candidates=captions)
                        for i in range(12)])

    def answers(ds):
        out = []
        for i in range(len(ds)):
            x = ds[i]
            out.append(tok_tiny.decode(x["input_ids"][x["labels"] != IGNORE_INDEX][:-1]))
        return out

    ds = make_dataset(path, tok_tiny, seed=3)
    epoch0 = answers(ds)
    assert epoch0 == [captions[candidate_choice(3, 0, i, 1, 5)] for i in range(12)]
    assert answers(make_dataset(path, tok_tiny, seed=3)) == epoch0  # same seed, same epoch
    ds.set_epoch(1)
    epoch1 = answers(ds)
    assert epoch1 != epoch0 and set(epoch0 + epoch1) <= set(captions)
    ds.set_epoch(0)
    assert answers(ds) == epoch0
    assert answers(make_dataset(path, tok_tiny, seed=4)) != epoch0
    # over many rows and epochs every caption gets its turn
    assert {candidate_choice(0, e, r, 1, 5) for e in range(3) for r in range(20)} == set(range(5))


def test_set_epoch_reaches_persistent_workers(tmp_path, tok_tiny):
    img = save_image(tmp_path / "a.png", 50)
    captions = [f"caption number {i}" for i in range(6)]
    path = write_jsonl(tmp_path / "train.jsonl",
                       [sample(f"aic:{i}", [img], f"{TAG} describe", captions[0], candidates=captions)
                        for i in range(4)])
    ds = make_dataset(path, tok_tiny, seed=1)
    loader = DataLoader(ds, batch_size=4, collate_fn=DataCollator(EOD), num_workers=1, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        batch = next(iter(loader))
        expected = DataCollator(EOD)([ds[i] for i in range(4)])  # in this process, same epoch
        assert torch.equal(batch["input_ids"], expected["input_ids"]), epoch


def test_bad_images_are_skipped(tmp_path, tok_tiny, caplog):
    good = save_image(tmp_path / "good.png", 70)
    truncated = tmp_path / "truncated.png"
    data = (tmp_path / "good.png").read_bytes()
    save_image(truncated, 90)
    truncated.write_bytes(truncated.read_bytes()[: len(data) // 2])
    path = write_jsonl(tmp_path / "train.jsonl", [
        sample("ok-0", [good], f"{TAG} a", "b"),
        sample("truncated", [str(truncated)], f"{TAG} a", "b"),
        sample("missing", [str(tmp_path / "missing.jpg")], f"{TAG} a", "b"),
        sample("ok-3", [good], f"{TAG} c", "d"),
    ])
    ds = make_dataset(path, tok_tiny)
    with caplog.at_level(logging.WARNING, logger="dataset.dataset"):
        x = ds[1]  # 1 and 2 fail to load: the next index that loads, 3
    assert torch.equal(x["input_ids"], ds[3]["input_ids"])
    assert ds.skipped == 2
    assert "truncated.png" in caplog.text and "missing.jpg" in caplog.text
    assert torch.equal(ds[2]["input_ids"], ds[3]["input_ids"]) and ds.skipped == 2  # counted once each
    assert torch.equal(ds[0]["input_ids"], make_dataset(path, tok_tiny)[0]["input_ids"])


def test_dataset_file_errors(tmp_path, tok_tiny):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_dataset(tmp_path / "nope.jsonl", tok_tiny)
    good = json.dumps(sample("a", [], "q", "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{good}\n\n{good}\n{{\"id\": \"broken\", \n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 4: not valid JSON"):
        make_dataset(bad, tok_tiny)
    bad.write_text(json.dumps(sample("tags", ["/x.png"], "no tag here", "a")) + "\n")
    with pytest.raises(ValueError, match=r"line 1 \(tags\): 0 image tags in its user turns but 1 images"):
        make_dataset(bad, tok_tiny)
    bad.write_text(json.dumps({"id": "roles", "source": "t", "images": [], "turns": conv("a", "b")[::-1]}) + "\n")
    with pytest.raises(ValueError, match=r"\(roles\): turn 0 is 'assistant', expected 'user'"):
        make_dataset(bad, tok_tiny)


def test_feature_loader(tmp_path, tok_tiny):
    path = write_jsonl(tmp_path / "train.jsonl", [sample("f", ["/a.png", "/b.png"], f"{TAG}{TAG}", "x"),
                                                  sample("t", [], "q", "a")])
    seen = []

    def loader(paths):
        seen.append(paths)
        return torch.zeros(len(paths), 4, 8)

    ds = SupervisedDataset(path, tok_tiny, None, num_image_tokens=4, system="", max_length=64, feature_loader=loader)
    batch = DataCollator(EOD)([ds[0], ds[1]])
    assert seen == [["/a.png", "/b.png"]] and batch["patch_features"].shape == (2, 4, 8)
    assert "pixel_values" not in batch


# --------------------------------------------------------------------------------------------------
# Preflight, as users run it
# --------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, vocab_file: str, output: Path) -> Path:
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "qwen.tiktoken").write_bytes(Path(vocab_file).read_bytes())
    (llm / "config.json").write_text(json.dumps({"model_type": "qwen"}))  # the family; no weights are read
    vision = tmp_path / "clip"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip",
                                                    "vision_config": {"image_size": 28, "patch_size": 14}}))
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  llm_path: llm\n  vision_path: clip\n  system_prompt: You are a helpful assistant.\n"
        "data:\n  sources:\n    - {format: llava, annotations: raw.json, image_dir: images}\n"
        f"  output: {output.name}\n  max_length: 64\n"
    )
    return config


def run_preflight(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dataset.preflight", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_preflight_cli(tmp_path, tok_tiny_vocab_file, capsys):
    img = save_image(tmp_path / "a.png", 50)
    output = write_jsonl(tmp_path / "train.jsonl", [
        sample("s0", [img], f"{TAG}\nWhat is it?", "A red circle."),
        sample("s1", [], "hello", "hi", "more", " ".join(["circle"] * 40)),
        sample("s2", [img], f"{TAG} " + " ".join(["square"] * 60), "no"),
    ])
    config = write_config(tmp_path, tok_tiny_vocab_file, output)
    result = run_preflight("--config", str(config), "--index", "0")
    assert result.returncode == 0, result.stderr
    assert "<|im_start|>user\n<image×4>\nWhat is it?<|im_end|>" in result.stdout
    assert "<|im_start|>assistant\n⟦A red circle.<|im_end|>⟧" in result.stdout
    assert "checked 3 samples: 2 usable, 1 truncated" in result.stdout and "1 unusable" in result.stdout
    assert "OK" in result.stdout

    # failures in process (a second interpreter costs seconds of imports): one message, status 1
    output.write_text(output.read_text().replace('"s1"', '"s1", oops', 1))
    assert preflight_main(["--config", str(config), "--check", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("preflight FAILED: ") and "train.jsonl, line 2: not valid JSON" in err
    output.write_text(json.dumps(sample("s9", [img, img], f"{TAG} one tag", "x")) + "\n")
    assert preflight_main(["--config", str(config)]) == 1
    assert "line 1 (s9): 1 image tags in its user turns but 2 images" in capsys.readouterr().err
    assert preflight_main(["--config", str(config), "--split", "val"]) == 1
    assert "train.val.jsonl" in capsys.readouterr().err


def test_preflight_checks_the_whole_config_as_train_py_does(tmp_path, tok_tiny_vocab_file, capsys):
    img = save_image(tmp_path / "a.png", 50)
    output = write_jsonl(tmp_path / "train.jsonl", [sample("s0", [img], f"{TAG}\nWhat is it?", "A red circle.")])
    config = write_config(tmp_path, tok_tiny_vocab_file, output)
    text = config.read_text()
    assert preflight_main(["--config", str(config)]) == 0
    capsys.readouterr()
    config.write_text(text + "training:\n  learning_rat: 1.0e-4\n")  # train.py would stop here
    assert preflight_main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("preflight FAILED: ") and "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in err
    config.write_text(text + "training:\n  projector_learning_rate: 1.0e-3\n  output_dir: out\n")
    assert preflight_main(["--config", str(config)]) == 0
