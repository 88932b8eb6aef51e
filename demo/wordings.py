"""The demo's question wordings, in three disjoint sets (the one owner of every question text the demo asks).

One question kind is a (language, attribute) pair: ("en", "colour"), ("zh", "position"), ...

- `TRAINED`: one wording per kind, the only ones the VLM's image training asks (the LLaVA-format conversations);
  the tiny QWen's text pretraining asks them too, about shapes described in words.
- `TEXT_ONLY`: other wordings that only the text pretraining asks, never with an image. With the image, they
  measure the transfer the real recipe relies on: the LLM learnt the language from text, the image training
  only makes pictures read like what the LLM already understands.
- `NEVER_SEEN`: wordings that no training text of the demo contains (neither the image training, nor the text
  pretraining, nor the tiny vocabulary's corpus): true novelty, reported without a target.

The text pretraining asks `TRAINED` and `TEXT_ONLY` alike (the real chat LLM had read every wording before the
visual instruction tuning), so what separates the first two sets at evaluation is only whether a wording was
ever asked about a picture. No wording of one set is contained in a wording of another (tested).
"""

from __future__ import annotations

Kind = tuple[str, str]  # (language, attribute)

TRAINED: dict[Kind, str] = {
    ("en", "colour"): "What colour is the shape?",
    ("en", "shape"): "What shape is it?",
    ("en", "position"): "Which corner of the image is the shape in?",
    ("zh", "colour"): "图形是什么颜色？",
    ("zh", "shape"): "这是什么形状？",
    ("zh", "position"): "图形在图片的哪个角？",
}

TEXT_ONLY: dict[Kind, tuple[str, ...]] = {
    ("en", "colour"): ("Which colour does the shape have?", "Tell me the colour of the shape.",
                       "What is the colour of the figure?", "Name the colour you see.",
                       "The shape is painted in which colour?"),
    ("en", "shape"): ("Which shape do you see?", "Name the shape in the picture.", "What kind of figure is drawn?",
                      "Tell me which shape this is.", "Is it a circle, a square or a triangle?"),
    ("en", "position"): ("In which corner is the shape?", "Where is the shape: which corner?",
                         "Tell me the corner the figure sits in.", "Which corner holds the shape?",
                         "Name the corner of the picture with the shape."),
    ("zh", "colour"): ("图形的颜色是什么？", "这个图形是什么颜色的？", "请说出图形的颜色。", "图中的形状是哪种颜色？",
                       "画的是什么颜色？"),
    ("zh", "shape"): ("图片里是什么形状？", "请说出图形的形状。", "图中画的是什么图形？", "这个图形是哪种形状？",
                      "它是圆形、正方形还是三角形？"),
    ("zh", "position"): ("图形在哪个角？", "这个形状在图片的什么位置？", "请说出图形所在的角。",
                         "图形位于图片的哪个角落？", "形状画在哪个角上？"),
}

NEVER_SEEN: dict[Kind, tuple[str, ...]] = {
    ("en", "colour"): ("What color is the shape?", "Could you say what colour it has?", "Its colour, please?"),
    ("en", "shape"): ("What kind of shape is this?", "What sort of figure appears here?", "Its shape, please?"),
    ("en", "position"): ("Which corner of the picture holds the shape?", "Where does the shape appear?",
                         "Its corner, please?"),
    ("zh", "colour"): ("图形是哪种颜色？", "你看到的形状是什么颜色？", "颜色是？"),
    ("zh", "shape"): ("图片上画了什么形状？", "你看到的是什么图形？", "形状是？"),
    ("zh", "position"): ("图形出现在哪个角？", "你看到的形状在哪个角落？", "是哪一个角？"),
}

SETS = {"trained": {k: (v,) for k, v in TRAINED.items()}, "text_only": TEXT_ONLY, "never_seen": NEVER_SEEN}
KINDS: tuple[Kind, ...] = tuple(TRAINED)


def wordings(which: str) -> list[str]:
    """Every wording of the set `which` ("trained", "text_only" or "never_seen")."""
    return [w for kind in KINDS for w in SETS[which][kind]]


def pretraining_wordings(kind: Kind) -> tuple[str, ...]:
    """The wordings the tiny QWen's text pretraining asks for `kind`: the trained one and the text-only ones."""
    return (TRAINED[kind], *TEXT_ONLY[kind])
