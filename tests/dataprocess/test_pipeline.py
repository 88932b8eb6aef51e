"""Raw AIC / LLaVA rows → unified samples → process_image.py outputs, on small hand-built raw sets with real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import visual.images
from dataprocess import pipeline
from dataprocess.aic import PROMPTS, clean_caption, convert_aic, prompt_for_row
from dataprocess.llava import convert_llava
from dataprocess.pipeline import PathError, check_image, process, split_validation
from dataprocess.schema import IMAGE_MARKER, Drop, Kept, read_samples, validate_sample
from settings import ConfigError, load_config
from visual.images import load_image

REPO = Path(__file__).resolve().parents[2]
SEED = 1234


# --------------------------------------------------------------------------------------------------
# A raw data set with every kind of good and bad row
# --------------------------------------------------------------------------------------------------


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth gradient with noise: JPEG-compressible like a photo, and not blank."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def make_images(d: Path) -> None:
    d.mkdir()
    Image.fromarray(_photo(64, 48, 0)).save(d / "aic_ok1.jpg", quality=90)
    Image.fromarray(_photo(40, 40, 1)).convert("L").save(d / "aic_gray.png")
    rgba = Image.fromarray(_photo(32, 32, 2)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "aic_rgba.png")
    Image.fromarray(_photo(32, 32, 3)).convert("CMYK").save(d / "aic_cmyk.jpg")
    big = _photo(256, 256, 4)
    Image.fromarray(big).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "aic_trunc.jpg").write_bytes(data[: len(data) // 2])
    (d / "ll_trunc.jpg").write_bytes(data[:-2])  # only the end-of-image marker missing
    (d / "full.jpg").unlink()
    (d / "aic_fake.jpg").write_text("this is not a JPEG\n")
    Image.fromarray(_photo(48, 32, 5)).save(d / "ll_a.jpg")
    Image.fromarray(_photo(30, 50, 6)).save(d / "ll_b.png")
    Image.fromarray(_photo(30, 30, 7)).convert("P").save(d / "ll_p.png")
    (d / "ll_dir.jpg").mkdir()


def aic_rows() -> list:
    return [
        {
            "url": "http://x/0",
            "image_id": "aic_ok1.jpg",
            "caption": ["  一只 猫\n坐在 沙发上。 ", "", "一只猫。", "一只猫。 "],
        },
        {"url": "u", "image_id": "aic_gray.png", "caption": ["文字 <|im_end|> 和 <|extra_0|> 都是文字。"]},
        {"url": "u", "image_id": "aic_rgba.png", "caption": ["透明 背景。"]},
        {"url": "u", "image_id": "aic_cmyk.jpg", "caption": ["CMYK 图片。"]},
        {"url": "u", "image_id": "aic_blank.jpg", "caption": ["", "  ", "\n"]},  # no captions
        "just a string",  # bad row
        {"url": "u", "image_id": "x.jpg", "caption": "not a list"},  # bad row
        {"url": "u", "caption": ["无图片"]},  # bad row
        {"url": "u", "image_id": "aic_trunc.jpg", "caption": ["截断。"]},  # image unreadable
        {"url": "u", "image_id": "aic_fake.jpg", "caption": ["假图片。"]},  # image unreadable
        {"url": "u", "image_id": "aic_missing.jpg", "caption": ["没有。"]},  # image missing
        {"url": "u", "image_id": "aic_ok1.jpg", "caption": ["重复。"]},  # duplicate id
        {"url": "u", "image_id": "aic_empty.jpg", "caption": []},  # no captions
    ]


def _conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def llava_rows() -> list:
    ok = _conv("<image>\nWhat is it?", "A photo.")
    return [
        {
            "id": "l0",
            "image": "ll_a.jpg",
            "conversations": _conv("What is this?\n<image>", "A cat.", "And the colour?", "Black."),
        },
        {"id": "l1", "conversations": _conv("Hi there", "Hello!")},  # text-only
        {
            "id": 2,
            "image": ["ll_a.jpg", "ll_b.png"],
            "conversations": _conv("<image>\n<image>\nCompare.", "Same <|extra_0|> <|im_end|>."),
        },
        {
            "id": "l3",
            "image": "ll_b.png",
            "conversations": _conv("<image>\nQ", "A", "Q2"),
        },  # malformed: ends with user
        {
            "id": "l4",
            "image": "ll_b.png",
            "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>Q"}],
        },
        {
            "id": "l5",
            "image": "ll_b.png",
            "conversations": _conv("<image>\nQ", "   "),
        },  # malformed: blank answer
        {
            "id": "l6",
            "image": "ll_b.png",
            "conversations": [{"from": "system", "value": "x"}, *ok],
        },  # unknown role
        {"id": "l7", "image": "ll_b.png", "conversations": _conv("No tag here", "A")},  # tag mismatch 0 vs 1
        {"id": "l8", "conversations": _conv("<image>\nQ", "A")},  # tag mismatch 1 vs 0
        {
            "id": "l9",
            "image": "ll_b.png",
            "conversations": _conv("<image>\nQ", "see <image>"),
        },  # tag in gpt turn
        {"id": "l10", "image": "ll_b.png", "conversations": "nope"},  # bad row
        ["not", "a", "dict"],  # bad row
        {"id": "l12", "image": 5, "conversations": ok},  # bad row
        {"id": "l13", "image": "ll_trunc.jpg", "conversations": ok},  # image unreadable
        {"id": "l14", "image": "ll_missing.jpg", "conversations": ok},  # image missing
        {"id": "l0", "image": "ll_b.png", "conversations": ok},  # duplicate id
        {"id": "l16", "image": "ll_b.png", "conversations": ok},
        {"id": "l17", "image": "ll_dir.jpg", "conversations": ok},  # image unreadable (not a file)
        {"id": "l18", "image": "ll_p.png", "conversations": ok},
    ]


def write_config(tmp: Path, data: dict, name: str = "config.yaml", **sections) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"data": data, **sections}, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """tmp/ with images/, aic.json, complex_reasoning.json and config.yaml (relative paths, 0 workers)."""
    make_images(tmp_path / "images")
    (tmp_path / "aic.json").write_text(json.dumps(aic_rows(), ensure_ascii=False), encoding="utf-8")
    (tmp_path / "complex_reasoning.json").write_text(json.dumps(llava_rows()), encoding="utf-8")
    data = {
        "sources": [
            {"format": "aic", "annotations": "aic.json", "image_dir": "images", "name": "aic"},
            {"format": "llava", "annotations": "complex_reasoning.json", "image_dir": "images"},
        ],
        "output": "out/train.jsonl",
        "seed": SEED,
        "num_workers": 0,
    }
    write_config(tmp_path, data, model={"anything": [1, 2]}, training="not even a mapping")
    return tmp_path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------------


def test_aic_row_exact_json(tmp_path):
    row = {
        "url": "u",
        "image_id": "a.jpg",
        "caption": [" 一只 猫\n坐在 沙发上。 ", "", "A  red\tcar.", "一只猫坐在沙发上。"],
    }
    (item,) = convert_aic([row], str(tmp_path), "aic", seed=SEED)
    assert isinstance(item, Kept) and item.raw_id == "a.jpg"
    assert prompt_for_row(SEED, 0) == "<image>\n这张图片里有什么？"  # pinned: same seed, same data
    expected = {
        "id": "aic:a.jpg",
        "source": "aic",
        "images": [str(tmp_path / "a.jpg")],
        "turns": [
            {"role": "user", "content": "<image>\n这张图片里有什么？"},
            {
                "role": "assistant",
                "content": "一只猫坐在沙发上。",
                "candidates": ["一只猫坐在沙发上。", "A red car."],
            },
        ],
    }
    assert json.dumps(item.sample, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)


def test_aic_prompts_are_seeded_per_row():
    prompts = [prompt_for_row(0, i) for i in range(300)]
    questions = Counter(p.replace(IMAGE_MARKER, "").strip() for p in prompts)
    assert len(PROMPTS) >= 5 and set(questions) == set(PROMPTS)
    assert all(p.startswith(IMAGE_MARKER + "\n") or p.endswith("\n" + IMAGE_MARKER) for p in prompts)
    before = sum(p.startswith(IMAGE_MARKER) for p in prompts)
    assert 100 < before < 200  # both placements, about half each
    assert prompts == [prompt_for_row(0, i) for i in range(300)]
    assert prompts != [prompt_for_row(1, i) for i in range(300)]
    # A row's prompt depends on its index only, not on which rows came before it (worker scheduling).
    rows = [{"image_id": f"{i}.jpg", "caption": ["x"]} for i in range(20)]
    alone = list(convert_aic(rows[7:8], "/img", "aic", seed=0))[0].sample["turns"][0]["content"]
    assert alone == prompt_for_row(0, 0)
    in_file = list(convert_aic(rows, "/img", "aic", seed=0))[7].sample["turns"][0]["content"]
    assert in_file == prompt_for_row(0, 7)


def test_clean_caption():
    assert clean_caption("  一个 男人\n 在  街上 走。\r\n") == "一个男人在街上走。"
    assert clean_caption("一个 NBA 球员\t在 投篮") == "一个 NBA 球员在投篮"
    assert clean_caption(" \n\t ") == ""


def test_llava_multi_turn_exact_json_keeps_tag_position(tmp_path):
    row = {
        "id": "l0",
        "image": "x/ll_a.jpg",
        "conversations": _conv("What is this?\n<image>", " A cat.\n", "And the colour?", "Black."),
    }
    (item,) = convert_llava([row], str(tmp_path), "cr")
    expected = (
        '{"id": "cr:l0", "source": "cr", "images": ["' + str(tmp_path / "x" / "ll_a.jpg") + '"], "turns": ['
        '{"role": "user", "content": "What is this?\\n<image>"}, {"role": "assistant", "content": "A cat."}, '
        '{"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "Black."}]}'
    )
    assert json.dumps(item.sample, ensure_ascii=False) == expected


def test_llava_drop_reasons_in_isolation():
    def reason(row):
        (item,) = convert_llava([row], "/img", "s")
        return item.reason if isinstance(item, Drop) else "kept"

    ok = _conv("<image>\nQ", "A")
    assert reason({"id": "a", "image": "a.jpg", "conversations": ok}) == "kept"
    assert reason({"id": "a", "conversations": _conv("Q", "A")}) == "kept"
    assert reason({"id": "a", "image": [], "conversations": _conv("Q", "A")}) == "kept"
    assert reason({"id": "a", "image": ["a.jpg", "b.jpg"], "conversations": ok}) == "tag mismatch"
    assert (
        reason({"id": "a", "image": "a.jpg", "conversations": _conv("Q\n<|extra_0|>", "A")}) == "tag mismatch"
    )
    assert reason({"id": "a", "image": "a.jpg", "conversations": []}) == "malformed turns"
    assert (
        reason({"id": "a", "image": "a.jpg", "conversations": _conv("<image>", "A")}) == "kept"
    )  # image-only question
    assert (
        reason({"id": "a", "image": "a.jpg", "conversations": _conv("<image>\nQ", "A", "Q2", "")})
        == "malformed turns"
    )
    assert (
        reason(
            {"id": "a", "image": "a.jpg", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]}
        )
        == "bad row"
    )
    assert reason({"image": "a.jpg", "conversations": ok}) == "bad row"
    assert reason({"id": True, "image": "a.jpg", "conversations": ok}) == "bad row"
    assert reason({"id": "a", "image": "", "conversations": ok}) == "bad row"


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def test_files_of_the_first_format_read_as_meant(tmp_path):
    """Files processed before the image marker was neutral held Qwen v1's <|extra_0|> in user turns: read back, a
    sample with exactly one such tag per image (and no <image>) has markers instead; a tag in a text-only sample,
    in an answer, or beside real markers stays text."""
    rows = [
        {"id": "s:old", "source": "s", "images": ["/i/a.jpg", "/i/b.jpg"], "turns": [
            {"role": "user", "content": "<|extra_0|>\nCompare with <|extra_0|>."},
            {"role": "assistant", "content": "Same <|extra_0|>."}]},
        {"id": "s:text", "source": "s", "images": [], "turns": [
            {"role": "user", "content": "What is <|extra_0|>?"}, {"role": "assistant", "content": "A token."}]},
        {"id": "s:new", "source": "s", "images": ["/i/a.jpg"], "turns": [
            {"role": "user", "content": "<image>\nIs <|extra_0|> text?"}, {"role": "assistant", "content": "Yes."}]},
    ]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    old, text, new = (sample for _, _, sample in read_samples(path))
    assert old["turns"] == [{"role": "user", "content": "<image>\nCompare with <image>."},
                            {"role": "assistant", "content": "Same <|extra_0|>."}]
    assert text == rows[1] and new == rows[2]
    mismatched = {**rows[0], "images": ["/i/a.jpg"]}  # two tags, one image: neither format, refused
    path.write_text(json.dumps(mismatched) + "\n")
    with pytest.raises(ValueError, match="0 image tags in its user turns but 1 images"):
        list(read_samples(path))


def test_image_check_agrees_with_the_training_reader(tmp_path):
    make_images(tmp_path / "img")
    d = tmp_path / "img"
    expected = {
        "aic_ok1.jpg": None,
        "aic_gray.png": None,
        "aic_rgba.png": None,
        "aic_cmyk.jpg": None,
        "ll_p.png": None,
        "aic_trunc.jpg": "corrupt",
        "ll_trunc.jpg": "corrupt",
        "aic_fake.jpg": "not an image",
        "nope.jpg": "missing",
        "ll_dir.jpg": "not a file",
    }
    for name, reason in expected.items():
        _, problem = check_image(str(d / name))
        assert (problem[0] if problem else None) == reason, name
        try:
            load_image(d / name)
            full = None
        except visual.images.ImageLoadError as e:
            full = e.reason
        assert full == reason, name


def test_jpeg_check_decodes_at_reduced_scale_and_pixel_cap_is_exact(tmp_path, monkeypatch):
    Image.fromarray(_photo(256, 160, 0)).save(tmp_path / "a.jpg")
    assert load_image(tmp_path / "a.jpg", draft_size=(1, 1)).size == (32, 20)  # 1/8 scale: 64x less memory
    assert load_image(tmp_path / "a.jpg").size == (256, 160)
    Image.fromarray(_photo(150, 100, 0)).save(tmp_path / "b.png")
    monkeypatch.setattr(
        visual.images, "MAX_IMAGE_PIXELS", 100 * 100
    )  # 1.5x the cap: Pillow alone only warns
    _, problem = check_image(str(tmp_path / "b.png"))
    assert problem is not None and problem[0] == "too large"


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def test_process_keeps_and_drops_exactly(raw):
    cfg = load_config(raw / "config.yaml", sections=("data",)).data
    report = process(cfg, progress=False).report
    out = raw / "out" / "train.jsonl"
    samples = read_jsonl(out) + read_jsonl(raw / "out" / "train.val.jsonl")
    for s in samples:
        validate_sample(s)
    kept = {"aic:aic_ok1.jpg", "aic:aic_gray.png", "aic:aic_rgba.png", "aic:aic_cmyk.jpg",
            "complex_reasoning:l0", "complex_reasoning:l1", "complex_reasoning:2", "complex_reasoning:l16",
            "complex_reasoning:l18"}  # fmt: skip
    assert {s["id"] for s in samples} == kept and len(samples) == len(kept)

    aic, llava = report["sources"]
    assert (aic["name"], llava["name"]) == ("aic", "complex_reasoning")  # default name: the file's stem
    counts = {r: e["count"] for r, e in aic["dropped_by_reason"].items()}
    assert counts == {
        "bad row": 3,
        "no captions": 2,
        "duplicate id": 1,
        "image missing": 1,
        "image unreadable": 2,
    }
    counts = {r: e["count"] for r, e in llava["dropped_by_reason"].items()}
    assert counts == {"bad row": 3, "malformed turns": 4, "tag mismatch": 3, "duplicate id": 1,
                      "image missing": 1, "image unreadable": 2}  # fmt: skip
    assert (aic["kept"], aic["dropped"], llava["kept"], llava["dropped"]) == (4, 9, 5, 14)
    assert report["kept"] == 9 and report["dropped"] == 23 and report["train"] + report["val"] == 9

    unreadable = aic["dropped_by_reason"]["image unreadable"]["examples"]
    assert [(e["row"], e["id"]) for e in unreadable] == [(8, "aic_trunc.jpg"), (9, "aic_fake.jpg")]
    assert "corrupt" in unreadable[0]["detail"] and "not an image" in unreadable[1]["detail"]
    bad = llava["dropped_by_reason"]["bad row"]["examples"]
    assert [(e["row"], e["id"]) for e in bad] == [(10, "l10"), (11, None), (12, "l12")]
    assert all(len(e["examples"]) <= 3 for e in llava["dropped_by_reason"].values())
    assert json.loads((raw / "out" / "train.jsonl.report.json").read_text(encoding="utf-8")) == report

    by_id = {s["id"]: s for s in samples}
    # Caption text that looks like special tokens stays text, in the assistant turn.
    assert by_id["aic:aic_gray.png"]["turns"][1]["content"] == "文字 <|im_end|> 和 <|extra_0|> 都是文字。"
    assert by_id["aic:aic_ok1.jpg"]["turns"][1]["candidates"] == ["一只猫坐在沙发上。", "一只猫。"]
    multi = by_id["complex_reasoning:2"]
    assert multi["images"] == [str(raw / "images" / "ll_a.jpg"), str(raw / "images" / "ll_b.png")]
    assert multi["turns"] == [
        {"role": "user", "content": "<image>\n<image>\nCompare."},
        {"role": "assistant", "content": "Same <|extra_0|> <|im_end|>."},
    ]
    assert by_id["complex_reasoning:l1"]["images"] == []
    assert len(by_id["complex_reasoning:l0"]["turns"]) == 4


def test_outputs_are_byte_identical_for_any_worker_count(raw):
    outputs = [raw / "out" / n for n in ("train.jsonl", "train.val.jsonl", "train.jsonl.report.json")]
    cfg = load_config(raw / "config.yaml", sections=("data",)).data
    runs = []
    for workers in (0, 2, 0):
        cfg.num_workers = workers
        process(cfg, progress=False)
        runs.append([p.read_bytes() for p in outputs])
    assert runs[0] == runs[1] == runs[2]
    cfg.seed = SEED + 1  # another seed: other prompts, so other bytes
    process(cfg, progress=False)
    assert outputs[0].read_bytes() != runs[0][0] or outputs[1].read_bytes() != runs[0][1]


def _samples(n: int, shared: int = 0) -> list[dict]:
    """n samples; the first `shared` use pairs of the same image."""
    out = []
    for i in range(n):
        image = f"/img/shared{i // 2}.jpg" if i < shared else f"/img/{i}.jpg"
        out.append({"id": f"s:{i}", "source": "s", "images": [image], "turns": []})
    return out


def test_validation_split_sizes_disjoint_and_deterministic():
    sizes = {}
    for n in (0, 1, 2, 19, 20, 39, 40, 100, 10_000):
        train, val = split_validation(_samples(n), val_size=200, seed=3)
        sizes[n] = len(val)
        assert len(train) + len(val) == n
        ids = [s["id"] for s in train + val]
        assert len(set(ids)) == n  # disjoint and complete
        assert [s["id"] for s in train] == sorted(
            (s["id"] for s in train), key=lambda x: int(x[2:])
        )  # order kept
    assert sizes == {0: 0, 1: 0, 2: 1, 19: 1, 20: 1, 39: 1, 40: 2, 100: 5, 10_000: 200}
    assert split_validation(_samples(100), 0, 3)[1] == []
    val_a = [s["id"] for s in split_validation(_samples(1000), 50, seed=3)[1]]
    assert val_a == [s["id"] for s in split_validation(_samples(1000), 50, seed=3)[1]]
    assert val_a != [s["id"] for s in split_validation(_samples(1000), 50, seed=4)[1]]
    # Samples sharing an image with another sample are not taken while others are available.
    _, val = split_validation(_samples(1000, shared=900), 50, seed=3)
    assert all("shared" not in s["images"][0] for s in val)


def test_a_failure_midway_leaves_previous_outputs_untouched(raw, monkeypatch):
    out = raw / "out"
    out.mkdir()
    for name in ("train.jsonl", "train.val.jsonl", "train.jsonl.report.json"):
        (out / name).write_text("previous\n")
    cfg = load_config(raw / "config.yaml", sections=("data",)).data

    calls = {"n": 0}
    real = pipeline.to_json_line

    def failing_writer(sample):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(sample)

    monkeypatch.setattr(pipeline, "to_json_line", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        process(cfg, progress=False)
    assert calls["n"] == 3
    monkeypatch.undo()

    def failing_converter(rows, image_dir, source):
        yield from convert_llava(rows[:2], image_dir, source)
        raise RuntimeError("converter bug")

    monkeypatch.setattr(pipeline, "convert_llava", failing_converter)
    with pytest.raises(RuntimeError, match="converter bug"):
        process(cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "train.jsonl",
        "train.jsonl.report.json",
        "train.val.jsonl",
    ]
    assert all(
        p.read_text() == "previous\n" for p in out.iterdir()
    )  # no temporary left, nothing half-written


def test_limit_and_config_value_errors(raw):
    cfg = load_config(raw / "config.yaml", sections=("data",)).data
    cfg.sources[1].limit = 3
    report = process(cfg, progress=False).report
    llava = report["sources"][1]
    assert (llava["rows"], llava["skipped_by_limit"], llava["kept"]) == (19, 16, 3)

    cfg.sources[1].name = "aic"
    with pytest.raises(ConfigError, match="source name 'aic'"):
        process(cfg, progress=False)
    cfg.sources[1].name, cfg.sources[1].format = None, "coco"
    with pytest.raises(ConfigError, match="format"):
        process(cfg, progress=False)
    cfg.sources[1].format, cfg.val_output = "llava", cfg.output
    with pytest.raises(ConfigError, match="different files"):
        process(cfg, progress=False)
    cfg.val_output, cfg.sources[0].image_dir = None, str(raw / "nowhere")
    with pytest.raises(PathError, match="image folder not found: .*nowhere"):
        process(cfg, progress=False)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def run_cli(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "process_image.py"), "--config", str(config)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_success_prints_the_report(raw):
    cfg = yaml.safe_load((raw / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["num_workers"] = 2
    result = run_cli(write_config(raw, cfg["data"], name="cli.yaml", model=None))
    assert result.returncode == 0, result.stderr
    assert "complex_reasoning (llava): 19 rows, kept 5, dropped 14" in result.stdout
    assert "  tag mismatch: 3" in result.stdout and "row 8 id l8" in result.stdout
    assert (raw / "out" / "train.jsonl").is_file()


def test_cli_errors_are_one_clear_line(raw):
    data = yaml.safe_load((raw / "config.yaml").read_text(encoding="utf-8"))["data"]
    cases = []

    bad = {**data, "num_worker": 2}
    cases.append(
        (
            write_config(raw, bad, name="typo.yaml"),
            2,
            "unknown key 'num_worker' (did you mean 'num_workers'?)",
        )
    )

    bad = {**data, "sources": [{**data["sources"][0], "annotations": "missing.json"}]}
    cases.append(
        (
            write_config(raw, bad, name="missing.yaml"),
            2,
            f"annotations file not found: {raw / 'missing.json'}",
        )
    )

    (raw / "broken.json").write_text('[{"image_id": "a.jpg", ')
    bad = {**data, "sources": [{**data["sources"][0], "annotations": "broken.json"}]}
    cases.append((write_config(raw, bad, name="broken.yaml"), 2, f"{raw / 'broken.json'}: not valid JSON"))

    (raw / "object.json").write_text('{"annotations": []}')
    bad = {**data, "sources": [{**data["sources"][0], "annotations": "object.json"}]}
    cases.append((write_config(raw, bad, name="object.yaml"), 2, "expected a JSON list of rows"))

    (raw / "empty_images").mkdir()
    bad = {
        **data,
        "sources": [{**data["sources"][0], "image_dir": "empty_images"}],
        "output": "out2/train.jsonl",
    }
    cases.append((write_config(raw, bad, name="nothing.yaml"), 1, "no sample was kept"))

    for config, code, message in cases:
        result = run_cli(config)
        assert result.returncode == code, (config.name, result.stdout, result.stderr)
        lines = [
            line for line in result.stderr.splitlines() if line.strip() and "decoding images" not in line
        ]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            config.name,
            lines,
        )
        assert "Traceback" not in result.stderr
    # Nothing kept: the report says why, and no empty training file replaces anything.
    assert not (raw / "out2" / "train.jsonl").exists()
    report = json.loads((raw / "out2" / "train.jsonl.report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 0 and report["dropped_by_reason"]["image missing"] == 7


def test_unknown_data_key_is_a_config_error(raw):
    data = yaml.safe_load((raw / "config.yaml").read_text(encoding="utf-8"))["data"]
    data["sources"][0]["image_folder"] = "images"
    with pytest.raises(ConfigError, match="unknown key 'image_folder'"):
        load_config(write_config(raw, data, name="bad.yaml"), sections=("data",))


def test_relative_paths_resolve_against_the_config_folder(raw, monkeypatch):
    monkeypatch.chdir(raw.parent)
    cfg = load_config(os.path.relpath(raw / "config.yaml"), sections=("data",)).data
    assert cfg.output == str(raw / "out" / "train.jsonl")
    assert cfg.sources[0].image_dir == str(raw / "images")


def test_an_unwritable_output_is_a_path_error(raw):
    (raw / "afile").write_text("a file, not a folder")
    cfg = load_config(raw / "config.yaml", sections=("data",)).data
    cfg.output = str(raw / "afile" / "train.jsonl")
    with pytest.raises(PathError, match="cannot write .*afile"):
        process(cfg, progress=False)
