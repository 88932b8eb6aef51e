"""A tiny but real Qwen-format vocabulary, for tests and the CPU demo (which trains it on its own text).

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

# A few KB of varied text in English and Chinese, with everyday sentences, numbers, punctuation, the ChatML
# role words and a little code: enough for about 1000 ranks. The demo adds its own text (demo/pretrain.py).
DEFAULT_CORPUS = """\
The positions are top left, top right, bottom left, bottom right, top, bottom, left, right and center.
system
You are a helpful assistant.
user
assistant
The sky is blue and the grass is green. The sun is yellow, and an apple can be red or green.
I think the answer is yes. We don't know where it is; they're looking for it, and it's getting late.
She said: "Hello, world!" He asked, "How are you today?" I'm fine, thanks. Let's go home.
In 2024 the model was trained for 3 epochs on 77,000 conversations and 210,000 captions.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 224 256 512 1024 2048 4096 8192.
def area(width, height):
    return width * height

if x > 0 and y < 10:
A cat is sleeping on the sofa, and a dog is playing with a ball in the garden.
Two people are walking down the street. A man is riding a bicycle next to a bus.
The kitchen has a table, four chairs, a window and a plate of fruit with bananas and oranges.
A woman is holding an umbrella in the rain. Children are running on the beach near the water.
The train is waiting at the station. A plane is flying above the clouds in the blue sky.
There are many books on the shelf, a lamp on the desk and a computer next to the phone.
Why is the man smiling? Because he is happy to see his friends after a long day at work.
Look at the photo carefully and answer: what is the person doing, and what might happen next?
The boy wears a red shirt and blue jeans; the girl wears a yellow dress and white shoes.

天空是蓝色的，草地是绿色的，太阳是黄色的。苹果可以是红色的，也可以是绿色的。
我们今天去公园，明天去学校。这个问题很简单，答案是对的。谢谢你的帮助！
一个人站在街道上，手里拿着一把红色的雨伞。两只猫坐在桌子上。
一只猫在沙发上睡觉，一只狗在花园里玩球。两个人在街上散步，一个男人在公交车旁边骑自行车。
厨房里有一张桌子、四把椅子、一扇窗户和一盘水果。一个女人在雨中撑着一把伞。
孩子们在海边奔跑。火车停在车站，飞机在蓝色的天空中飞行。书架上有很多书，桌子上有一盏灯。
这个男孩穿着红色的衬衫和蓝色的裤子，这个女孩穿着黄色的裙子和白色的鞋子。
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
