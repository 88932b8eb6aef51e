"""Synthetic raw data for the CPU demo: one coloured shape in one quadrant, asked about in English and Chinese.

Each image holds ONE shape (circle, square, triangle) in one of 6 well-separated colours, inside one of
the 4 quadrants, on a light background (two light colours in a gradient plus blotchy noise). The shape's
side is 30-40% of the image side: at that size a random frozen vision tower can tell the shapes apart
(see DEMO-NOTES.md). Everything comes from the seed, so the same call writes the same bytes.

`write_demo_raw_data` writes both raw formats, so the demo goes through process_image.py like real data:

    out_dir/
      llava_demo.json     LLaVA rows, one conversation of 6 questions per image (colour, shape, position;
      llava_images/         en + zh; seeded order; <image> in the first human turn)
      aic_demo.json       AI Challenger rows, five Chinese captions per image, on a separate set of images
      aic_images/
      heldout.json        [{"image": "heldout_images/000000.png", "questions": [{"lang", "attribute",
      heldout_images/        "question", "answer", "wording"}, ...]}] on images used by neither training set

The held-out questions, per image: each kind (language, attribute) asked in its image-training wording
("wording": "trained"), in one wording only the text pretraining asks ("text_only") and in one no training
text contains ("never_seen"), the last two drawn per image (seeded); the sets are in demo/wordings.py. Score
answers with `normalise_answer(generated, lang) == normalise_answer(expected, lang)`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.fileio import staged_folder
from demo.wordings import KINDS, NEVER_SEEN, TEXT_ONLY, TRAINED


@dataclass(frozen=True)
class Word:
    en: str
    zh: str


# Keys are the canonical labels (the English names).
COLOURS = {
    "red": Word("red", "红色"),
    "green": Word("green", "绿色"),
    "blue": Word("blue", "蓝色"),
    "yellow": Word("yellow", "黄色"),
    "purple": Word("purple", "紫色"),
    "orange": Word("orange", "橙色"),
}
COLOUR_RGB = {  # saturated, each far from the others and from every light background (all channels >= 185)
    "red": (215, 30, 30),
    "green": (30, 150, 45),
    "blue": (35, 65, 215),
    "yellow": (235, 205, 10),
    "purple": (125, 35, 165),
    "orange": (240, 125, 10),
}
SHAPES = {
    "circle": Word("circle", "圆形"),
    "square": Word("square", "正方形"),
    "triangle": Word("triangle", "三角形"),
}
POSITIONS = {
    "top left": Word("top left", "左上"),
    "top right": Word("top right", "右上"),
    "bottom left": Word("bottom left", "左下"),
    "bottom right": Word("bottom right", "右下"),
}
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
# The questions the image training asks (one wording per kind); the other wordings are in demo/wordings.py.
QUESTIONS = TRAINED
AIC_TEMPLATES = (  # {p}: position, {c}: colour, {s}: shape, all in Chinese
    "{p}角有一个{c}的{s}。",
    "图片的{p}角是一个{c}{s}。",
    "一个{c}的{s}位于图片的{p}角。",
    "在图片的{p}角，画着一个{c}的{s}。",
    "浅色背景上，{p}角有一个{c}{s}。",
)
SHAPE_SIDE = (0.30, 0.40)  # fraction of the image side
EDGE_MARGIN = 0.03  # fraction of the image side kept free around the shape inside its quadrant
_SETS = {"llava": 0, "aic": 1, "heldout": 2}


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Case-folded, full-width folded (NFKC), punctuation and whitespace removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


_SYNONYMS = {
    "en": {
        "upper left": "top left",
        "upper right": "top right",
        "lower left": "bottom left",
        "lower right": "bottom right",
        "violet": "purple",
    },
    "zh": {
        "红": "red",
        "绿": "green",
        "蓝": "blue",
        "黄": "yellow",
        "紫": "purple",
        "橙": "orange",
        "橘色": "orange",
        "圆": "circle",
        "圆圈": "circle",
        "方形": "square",
        "三角": "triangle",
        "左上角": "top left",
        "右上角": "top right",
        "左下角": "bottom left",
        "右下角": "bottom right",
    },
}
_ANSWERS = {
    lang: {
        **{_clean(getattr(word, lang)): key for vocab in ATTRIBUTES.values() for key, word in vocab.items()},
        **{_clean(text): key for text, key in _SYNONYMS[lang].items()},
    }
    for lang in ("en", "zh")
}


def normalise_answer(text: str, lang: str) -> str | None:
    """The canonical label ("red", "circle", "top left") that `text` names in `lang`, or None.

    Case, whitespace and punctuation do not matter ("Top-left." and "top left" are the same answer);
    an answer in the other language, or a sentence around the word, names no label (None), so it
    never equals the expected label.
    """
    if lang not in _ANSWERS:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    return _ANSWERS[lang].get(_clean(text))


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    position: str

    def answer(self, attribute: str, lang: str) -> str:
        return getattr(ATTRIBUTES[attribute][getattr(self, attribute)], lang)


def shape_box(position: str, image_size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(x0, y0, side) of the shape's square bounding box, inside the quadrant `position`."""
    side = round(rng.uniform(*SHAPE_SIDE) * image_size)
    half, margin = image_size // 2, round(EDGE_MARGIN * image_size)
    qy = 0 if position.startswith("top") else half
    qx = 0 if position.endswith("left") else half
    slack = max(0, half - side - 2 * margin)
    return qx + margin + int(rng.integers(0, slack + 1)), qy + margin + int(rng.integers(0, slack + 1)), side


@functools.lru_cache(maxsize=4)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    return yy, xx


def draw_image(item: Item, image_size: int, rng: np.random.Generator) -> Image.Image:
    # Background: a gradient between two light colours in a random direction, plus blotchy noise
    # (4x4-pixel cells: varied like fine noise, yet PNG-compressible, so the demo data stays small).
    light = rng.uniform(185, 245, size=(2, 3, 1, 1)).astype(np.float32)  # [2 colours, C, 1, 1]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(image_size)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))  # [H, W] in 0..1
    cells = rng.normal(0.0, 4.0, size=(3, image_size // 4 + 1, image_size // 4 + 1)).astype(np.float32)
    noise = cells.repeat(4, axis=1).repeat(4, axis=2)[:, :image_size, :image_size]  # [C, H, W]
    background = light[0] + (light[1] - light[0]) * t + noise + 0.5  # [C, H, W]; +0.5: round, not floor
    pixels = np.minimum(background, 255.0).astype(np.uint8).transpose(1, 2, 0)  # [H, W, C], all >= 160
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB")

    # The shape: one flat colour (the class colour, jittered a little) inside its square box.
    x0, y0, side = shape_box(item.position, image_size, rng)
    x1, y1 = x0 + side - 1, y0 + side - 1
    colour = tuple(
        int(v) for v in np.clip(np.add(COLOUR_RGB[item.colour], rng.integers(-12, 13, size=3)), 0, 255)
    )
    draw = ImageDraw.Draw(img)
    if item.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif item.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:  # an upright triangle: base on the bottom of the box, apex at the top middle
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    return img


def plan_items(n: int, seed: int, which: str) -> list[Item]:
    """`n` items covering the 72 (colour, shape, position) combinations as evenly as possible, shuffled."""
    combos = [Item(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]
    rng = np.random.default_rng([seed, _SETS[which]])
    items = []
    while len(items) < n:
        items.extend(combos[i] for i in rng.permutation(len(combos)))
    return items[:n]


def _write_images(folder: Path, items: list[Item], image_size: int, seed: int, which: str) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, item in enumerate(items):
        rng = np.random.default_rng([seed, _SETS[which], i])
        name = f"{i:06d}.png"
        draw_image(item, image_size, rng).save(folder / name, compress_level=1)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Raw annotation files
# --------------------------------------------------------------------------------------------------


def llava_row(index: int, image: str, item: Item, rng: np.random.Generator) -> dict[str, Any]:
    order = rng.permutation(len(QUESTIONS))
    conversations = []
    for n, k in enumerate(order):
        lang, attribute = list(QUESTIONS)[k]
        question = QUESTIONS[lang, attribute]
        conversations.append({"from": "human", "value": f"<image>\n{question}" if n == 0 else question})
        conversations.append({"from": "gpt", "value": item.answer(attribute, lang)})
    return {"id": f"demo-{index:06d}", "image": image, "conversations": conversations}


def aic_row(image: str, item: Item, rng: np.random.Generator) -> dict[str, Any]:
    words = {
        "p": item.answer("position", "zh"),
        "c": item.answer("colour", "zh"),
        "s": item.answer("shape", "zh"),
    }
    captions = [AIC_TEMPLATES[k].format(**words) for k in rng.permutation(len(AIC_TEMPLATES))]
    return {"url": "", "image_id": image, "caption": captions}


def heldout_row(image: str, item: Item, rng: np.random.Generator) -> dict[str, Any]:
    """18 questions: each kind in its trained wording, then in a text-only one, then in a never-seen one
    ("wording": "trained" / "text_only" / "never_seen"; the last two drawn from their sets with `rng`)."""
    questions = []
    for which, choices in (("trained", {k: (TRAINED[k],) for k in KINDS}), ("text_only", TEXT_ONLY),
                           ("never_seen", NEVER_SEEN)):
        for lang, attribute in KINDS:
            options = choices[lang, attribute]
            questions.append({"lang": lang, "attribute": attribute, "question": options[rng.integers(len(options))],
                              "answer": item.answer(attribute, lang), "wording": which})
    return {"image": image, "questions": questions}


def _dump(path: Path, rows: list[Any]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_demo_raw_data(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 1000,
    n_aic: int = 300,
    n_heldout: int = 200,
    image_size: int = 112,
    seed: int = 0,
) -> dict[str, str]:
    """Write the demo's raw data set into `out_dir` (replaced if it exists) and return its paths.

    n_train: images of the LLaVA conversations; n_aic: other images, with Chinese captions; n_heldout:
    images of neither, for evaluation. Built in a temporary folder beside `out_dir`, then renamed.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = Path(out_dir).absolute()
    with staged_folder(out) as tmp:
        llava_items = plan_items(n_train, seed, "llava")
        names = _write_images(tmp / "llava_images", llava_items, image_size, seed, "llava")
        rng = np.random.default_rng([seed, 10])
        _dump(
            tmp / "llava_demo.json",
            [llava_row(i, n, it, rng) for i, (n, it) in enumerate(zip(names, llava_items))],
        )

        aic_items = plan_items(n_aic, seed, "aic")
        names = _write_images(tmp / "aic_images", aic_items, image_size, seed, "aic")
        rng = np.random.default_rng([seed, 11])
        _dump(tmp / "aic_demo.json", [aic_row(n, it, rng) for n, it in zip(names, aic_items)])

        heldout_items = plan_items(n_heldout, seed, "heldout")
        names = _write_images(tmp / "heldout_images", heldout_items, image_size, seed, "heldout")
        rng = np.random.default_rng([seed, 12])
        _dump(
            tmp / "heldout.json",
            [heldout_row(f"heldout_images/{n}", it, rng) for n, it in zip(names, heldout_items)],
        )
    return {
        "root": str(out),
        "llava_annotations": str(out / "llava_demo.json"),
        "llava_image_dir": str(out / "llava_images"),
        "aic_annotations": str(out / "aic_demo.json"),
        "aic_image_dir": str(out / "aic_images"),
        "heldout": str(out / "heldout.json"),
    }


def demo_data_section(
    paths: dict[str, str], output: str, *, seed: int = 0, val_size: int = 50, num_workers: int = 0
) -> dict[str, Any]:
    """The `data` section of a config that runs process_image.py on what `write_demo_raw_data` wrote."""
    return {
        "sources": [
            {
                "format": "llava",
                "annotations": paths["llava_annotations"],
                "image_dir": paths["llava_image_dir"],
            },
            {"format": "aic", "annotations": paths["aic_annotations"], "image_dir": paths["aic_image_dir"]},
        ],
        "output": output,
        "val_size": val_size,
        "seed": seed,
        "num_workers": num_workers,
    }
