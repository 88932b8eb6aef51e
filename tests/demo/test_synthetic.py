"""The demo's synthetic raw data: deterministic, correct pixels, separate held-out images, clean through
process_image."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dataprocess.pipeline import process
from demo.synthetic import (
    AIC_TEMPLATES,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    demo_data_section,
    normalise_answer,
    write_demo_raw_data,
)
from demo.wordings import SETS
from settings import load_config

SIZES = {"n_train": 36, "n_aic": 12, "n_heldout": 24}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    return write_demo_raw_data(tmp_path_factory.mktemp("demo") / "raw", **SIZES, seed=7)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pixels_digest(folder: Path) -> set[str]:
    return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in folder.glob("*.png")}


def test_same_seed_same_bytes_other_seed_other_bytes(demo, tmp_path):
    again = write_demo_raw_data(tmp_path / "again", **SIZES, seed=7)
    first = tree_digest(Path(demo["root"]))
    assert len(first) == 3 + sum(SIZES.values())
    assert tree_digest(Path(again["root"])) == first
    other = tree_digest(Path(write_demo_raw_data(tmp_path / "other", **SIZES, seed=8)["root"]))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first if k.endswith(".png"))


def test_rewrite_replaces_the_folder_atomically(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_demo_raw_data(out, n_train=2, n_aic=1, n_heldout=1)
    assert not (out / "stale.txt").exists() and (out / "llava_demo.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary folder left


def labels_of_llava_row(row: dict) -> dict[str, str]:
    """(attribute -> English label) from the row's English answers."""
    en_question = {q: attr for (lang, attr), q in QUESTIONS.items() if lang == "en"}
    labels = {}
    convs = row["conversations"]
    for human, gpt in zip(convs[::2], convs[1::2]):
        question = human["value"].replace("<image>\n", "")
        if question in en_question:
            labels[en_question[question]] = gpt["value"]
    return labels


def test_the_shape_is_where_and_what_the_answers_say(demo):
    rows = json.loads(Path(demo["llava_annotations"]).read_text(encoding="utf-8"))
    assert len(rows) == SIZES["n_train"]
    seen = set()
    for row in rows:
        labels = labels_of_llava_row(row)
        seen.add((labels["colour"], labels["shape"], labels["position"]))
        img = np.asarray(
            Image.open(Path(demo["llava_image_dir"]) / row["image"]).convert("RGB"), dtype=np.int32
        )
        size = img.shape[0]
        assert img.shape == (112, 112, 3)
        distance = {c: np.abs(img - np.array(rgb)).sum(-1) for c, rgb in COLOUR_RGB.items()}
        mask = distance[labels["colour"]] < 45
        for other in COLOURS:  # no pixel of any other class colour
            if other != labels["colour"]:
                assert (distance[other] < 45).sum() == 0, (row["id"], other)
        assert ((img < 150).any(-1) == mask).all()  # everything that is not light background is the shape
        ys, xs = np.nonzero(mask)
        top, left = ys.min() / size, xs.min() / size
        bottom, right = (ys.max() + 1) / size, (xs.max() + 1) / size
        vertical, horizontal = labels["position"].split()
        assert (bottom <= 0.5) if vertical == "top" else (top >= 0.5), (row["id"], labels)
        assert (right <= 0.5) if horizontal == "left" else (left >= 0.5), (row["id"], labels)
        side = max(bottom - top, right - left)
        assert 0.29 <= side <= 0.41, (row["id"], side)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        expected_fill = {"square": (0.97, 1.0), "circle": (0.74, 0.84), "triangle": (0.45, 0.58)}[
            labels["shape"]
        ]
        assert expected_fill[0] <= fill <= expected_fill[1], (row["id"], labels["shape"], fill)
    assert len(seen) == SIZES["n_train"]  # 36 images: 36 different combinations (of 72), balanced


def test_conversations_captions_and_heldout_questions(demo):
    rows = json.loads(Path(demo["llava_annotations"]).read_text(encoding="utf-8"))
    orders = set()
    for row in rows:
        humans = [m["value"] for m in row["conversations"][::2]]
        assert humans[0].startswith("<image>\n") and all("<image>" not in h for h in humans[1:])
        asked = [h.replace("<image>\n", "") for h in humans]
        assert sorted(asked) == sorted(QUESTIONS.values())
        orders.add(tuple(asked))
        pairs = list(zip(row["conversations"][::2], row["conversations"][1::2]))
        zh = {attr: gpt["value"] for (lang, attr), q in QUESTIONS.items() if lang == "zh"
              for human, gpt in pairs if human["value"].endswith(q)}
        labels = labels_of_llava_row(row)
        assert zh == {
            a: {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}[a][labels[a]].zh for a in labels
        }
    assert len(orders) > len(rows) // 2  # seeded random order, not one fixed order

    for row in json.loads(Path(demo["aic_annotations"]).read_text(encoding="utf-8")):
        captions = row["caption"]
        assert len(captions) == len(AIC_TEMPLATES) == len(set(captions)) == 5
        words = [
            w
            for w in (*(c.zh for c in COLOURS.values()), *(s.zh for s in SHAPES.values()))
            if w in captions[0]
        ]
        assert all(all(w in c for w in words) for c in captions) and len(words) == 2

    heldout = json.loads(Path(demo["heldout"]).read_text(encoding="utf-8"))
    assert len(heldout) == SIZES["n_heldout"]
    asked = {which: set() for which in SETS}
    for item in heldout:
        assert (Path(demo["root"]) / item["image"]).is_file()
        assert len(item["questions"]) == 18
        for which in SETS:  # each kind once per wording set, in a wording of that set
            questions = [q for q in item["questions"] if q["wording"] == which]
            assert sorted((q["lang"], q["attribute"]) for q in questions) == sorted(QUESTIONS)
            assert all(q["question"] in SETS[which][q["lang"], q["attribute"]] for q in questions)
            asked[which] |= {q["question"] for q in questions}
        answers = {(q["lang"], q["attribute"]): q["answer"] for q in item["questions"] if q["wording"] == "trained"}
        assert all(q["answer"] == answers[q["lang"], q["attribute"]] for q in item["questions"])
        labels = {normalise_answer(q["answer"], q["lang"]) for q in item["questions"]}
        assert len(labels) == 3 and all(label in {**COLOURS, **SHAPES, **POSITIONS} for label in labels)
    # the wordings vary from image to image (seeded): most of each set is asked about 24 images
    assert len(asked["text_only"]) > len(asked["never_seen"]) > 12


def test_heldout_images_are_not_training_images(demo):
    root = Path(demo["root"])
    train = pixels_digest(root / "llava_images") | pixels_digest(root / "aic_images")
    heldout = pixels_digest(root / "heldout_images")
    assert len(train) == SIZES["n_train"] + SIZES["n_aic"] and len(heldout) == SIZES["n_heldout"]
    assert not train & heldout


def test_raw_files_go_through_process_image_with_no_drops(demo, tmp_path):
    config = tmp_path / "config.yaml"
    data = demo_data_section(demo, str(tmp_path / "out" / "train.jsonl"), seed=3, val_size=2)
    config.write_text(yaml.safe_dump({"data": data}), encoding="utf-8")
    report = process(load_config(config, sections=("data",)).data, progress=False).report
    assert report["dropped"] == 0 and report["kept"] == SIZES["n_train"] + SIZES["n_aic"]
    assert (report["train"], report["val"]) == (46, 2)


def test_normalise_answer():
    assert normalise_answer("Red.", "en") == "red"
    assert normalise_answer("  TOP-left! ", "en") == "top left"
    assert normalise_answer("upper right", "en") == "top right"
    assert normalise_answer("红色。", "zh") == "red"
    assert normalise_answer("左上角", "zh") == "top left"
    assert normalise_answer("正方形", "zh") == "square"
    assert normalise_answer("三角形", "zh") == normalise_answer("triangle", "en") == "triangle"
    assert normalise_answer("红色", "en") is None  # the wrong language is a wrong answer
    assert normalise_answer("red", "zh") is None
    assert normalise_answer("reddish", "en") is None
    assert normalise_answer("The shape is red", "en") is None
    with pytest.raises(ValueError):
        normalise_answer("red", "fr")
