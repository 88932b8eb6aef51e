"""A tiny but real Qwen-format vocabulary, for tests and the CPU demo.

`train_bpe` learns a byte-level BPE the way tiktoken applies one: ranks 0..255 are the single bytes
(rank i = byte i), then each new rank is the most frequent adjacent pair of the corpus, after the
corpus is cut with Qwen's own pre-tokenisation pattern (BPE never merges across those pieces).
Each word is kept segmented exactly as tiktoken would segment it with the ranks learnt so far
(repeatedly merge the adjacent pair whose concatenation has the lowest rank, leftmost first), so
every learnt token is reachable by tiktoken and appears after the parts it is made of.

`write_tiktoken_file` writes ranks in the `qwen.tiktoken` format (`base64(token) rank` per line);
`write_tiny_vocab` does both with the built-in English/Chinese corpus. The output depends only on
the corpus and the size: ties between equally frequent pairs go to the smallest byte string.
"""

from __future__ import annotations

import base64
import heapq
import os
import unicodedata
from collections import Counter

import regex

from qwen.tokenization_qwen import PAT_STR, VOCAB_FILE_NAME

DEFAULT_VOCAB_SIZE = 1024  # the default corpus supports up to about 1600

# A few KB of varied text about the demo's world (coloured shapes in a picture), in English and
# Chinese, with some everyday sentences, numbers, punctuation and a little code.
DEFAULT_CORPUS = """\
What is in this picture? This picture shows a red circle in the top left corner.
There is a green square in the top right corner and a blue triangle in the bottom left corner.
A yellow circle is at the bottom right. The purple square is in the middle of the image.
An orange triangle sits near the left edge; a red square sits near the right edge.
What color is the circle? The circle is red. What shape is at the top? A green square is at the top.
Where is the blue triangle? The blue triangle is in the bottom left of the picture.
How many shapes are there? There are three shapes: a circle, a square and a triangle.
Which shape is on the left? The yellow triangle is on the left, and the purple circle is on the right.
The colors are red, green, blue, yellow, purple and orange. The shapes are circle, square and triangle.
The positions are top left, top right, bottom left, bottom right, top, bottom, left, right and center.
Describe the image. The image has a white background with two shapes: an orange circle at the top
and a blue square at the bottom. The circle is small and the square is large.
Is there a red triangle? No, there is no red triangle. There is a red circle and a green triangle.
Please describe the colors and positions of all shapes in the picture, one by one.
User: What do you see? Assistant: I see a purple triangle in the top right corner of the picture.
You are a helpful assistant. Answer the question about the image in one short sentence.
system
You are a helpful assistant.
user
What is in the picture?
assistant
A red circle and a blue square.
Each shape has one color and one position. The big square is blue; the small circle is orange.
The sky is blue and the grass is green. The sun is yellow, and an apple can be red or green.
I think the answer is yes. We don't know where it is; they're looking for it, and it's getting late.
She said: "Hello, world!" He asked, "How are you today?" I'm fine, thanks. Let's go home.
In 2024 the model was trained for 3 epochs on 77,000 conversations and 210,000 captions.
The learning rate was 0.0002, the batch size was 16, and each image became 256 tokens.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 224 256 512 1024 2048 4096 8192.
def area(width, height):
    return width * height

for shape in ["circle", "square", "triangle"]:
    print(f"{shape}: {area(3, 4)}")
if x > 0 and y < 10:
    result = {"color": "red", "shape": "circle", "position": [1, 2]}
A cat is sleeping on the sofa, and a dog is playing with a ball in the garden.
Two people are walking down the street. A man is riding a bicycle next to a bus.
The kitchen has a table, four chairs, a window and a plate of fruit with bananas and oranges.
A woman is holding an umbrella in the rain. Children are running on the beach near the water.
The train is waiting at the station. A plane is flying above the clouds in the blue sky.
There are many books on the shelf, a lamp on the desk and a computer next to the phone.
Why is the man smiling? Because he is happy to see his friends after a long day at work.
Look at the photo carefully and answer: what is the person doing, and what might happen next?
The boy wears a red shirt and blue jeans; the girl wears a yellow dress and white shoes.
Count the objects: one circle, two squares, three triangles, four stars and five lines.
Move the small green circle to the upper left, then put the large orange square in the lower right.

这是什么？这是一张图片。图片的左上角有一个红色的圆形，右上角有一个绿色的正方形。
左下角有一个蓝色的三角形，右下角有一个黄色的圆形。图片中间有一个紫色的正方形。
这个圆形是什么颜色？这个圆形是红色的。这个三角形在什么位置？这个三角形在左下角。
图片里有几个形状？图片里有三个形状：一个圆形、一个正方形和一个三角形。
请描述图片中每个形状的颜色和位置。橙色的三角形在右上，紫色的圆形在左上。
颜色有红色、绿色、蓝色、黄色、紫色和橙色。形状有圆形、正方形和三角形。
位置有左上、右上、左下、右下、上面、下面、左边、右边和中间。
这张图片的背景是白色的，上面有两个形状：一个橙色的圆形和一个蓝色的正方形。
图片上方是一个绿色的正方形，下方是一个红色的三角形。这是什么形状？这是正方形。
用户：你看到了什么？助手：我看到图片右下角有一个黄色的三角形。
你是一个有用的助手。请用一句话回答关于图片的问题。
天空是蓝色的，草地是绿色的，太阳是黄色的。苹果可以是红色的，也可以是绿色的。
我们今天去公园，明天去学校。这个问题很简单，答案是对的。谢谢你的帮助！
一个人站在街道上，手里拿着一把红色的雨伞。两只猫坐在桌子上。
模型在七万七千条对话和二十一万条描述上训练了三轮，每张图片变成二百五十六个词元。
红色。绿色。蓝色。黄色。紫色。橙色。圆形。正方形。三角形。
左上，右上，左下，右下。颜色，形状，位置，图片。这是什么？这是什么颜色？这是什么形状？
一只猫在沙发上睡觉，一只狗在花园里玩球。两个人在街上散步，一个男人在公交车旁边骑自行车。
厨房里有一张桌子、四把椅子、一扇窗户和一盘水果。一个女人在雨中撑着一把伞。
孩子们在海边奔跑。火车停在车站，飞机在蓝色的天空中飞行。书架上有很多书，桌子上有一盏灯。
这个男孩穿着红色的衬衫和蓝色的裤子，这个女孩穿着黄色的裙子和白色的鞋子。
数一数：一个圆形，两个正方形，三个三角形，四颗星星和五条线。
把小的绿色圆形移到左上，再把大的橙色正方形放到右下。请看图片并回答问题。
"""


def _pieces(corpus: str) -> Counter[bytes]:
    """Pre-tokenise like the tokenizer (NFC, then Qwen's pattern) and count each piece's bytes."""
    text = unicodedata.normalize("NFC", corpus)
    return Counter(piece.encode("utf-8") for piece in regex.findall(PAT_STR, text))


def _merge(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge loop: merge the adjacent pair whose concatenation has the lowest rank, until none has one."""
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def train_bpe(corpus: str, vocab_size: int) -> dict[bytes, int]:
    """Learn `vocab_size` ranks (256 single bytes + merges) from `corpus`. Deterministic.

    Raises ValueError if vocab_size < 256 or the corpus has too few distinct pairs to reach it.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the single bytes), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    words = sorted(_pieces(corpus).items())  # [(piece bytes, count)], sorted for determinism
    parts = [[bytes([b]) for b in word] for word, _ in words]
    counts = [count for _, count in words]

    # pair_counts is keyed by the pair's concatenation, because that is what tiktoken looks up.
    pair_counts: Counter[bytes] = Counter()
    where: dict[bytes, set[int]] = {}
    for w, p in enumerate(parts):
        for a, b in zip(p, p[1:]):
            pair_counts[a + b] += counts[w]
            where.setdefault(a + b, set()).add(w)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size:
        while heap and (-heap[0][0] != pair_counts.get(heap[0][1], 0) or heap[0][0] == 0):
            heapq.heappop(heap)  # stale entry
        if not heap:
            raise ValueError(f"the corpus only supports {len(ranks)} ranks, {vocab_size} were asked for")
        _, new = heapq.heappop(heap)
        ranks[new] = len(ranks)
        changed: set[bytes] = set()
        for w in sorted(where.pop(new)):
            old = parts[w]
            for a, b in zip(old, old[1:]):
                pair_counts[a + b] -= counts[w]
                changed.add(a + b)
            parts[w] = _merge(old, ranks)
            p = parts[w]
            for a, b in zip(p, p[1:]):
                pair_counts[a + b] += counts[w]
                where.setdefault(a + b, set()).add(w)
                changed.add(a + b)
        for pair in sorted(changed):
            n = pair_counts[pair]
            if n <= 0:
                del pair_counts[pair]
            elif pair not in ranks:
                heapq.heappush(heap, (-n, pair))
    return ranks


def write_tiktoken_file(ranks: dict[bytes, int], path: str | os.PathLike) -> str:
    """Write ranks as `base64(token) rank` lines, in rank order. Ranks must be exactly 0..n-1."""
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in ordered] != list(range(len(ordered))):
        raise ValueError("ranks must be the contiguous integers 0..n-1, each used once")
    path = os.fspath(path)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for token, rank in ordered:
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    return path


def write_tiny_vocab(path: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str | None = None) -> str:
    """Train on `corpus` (default: the built-in one) and write the vocabulary to `path`.

    `path` is the file to write, or an existing folder to write `qwen.tiktoken` into. Returns the file path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, VOCAB_FILE_NAME)
    ranks = train_bpe(DEFAULT_CORPUS if corpus is None else corpus, vocab_size)
    return write_tiktoken_file(ranks, path)
