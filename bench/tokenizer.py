"""Tokenizer speed: building the tiny BPE vocabulary (every test session and the CPU demo build one) and
encoding with QWenTokenizer. Prints one JSON line.

    python -m bench.tokenizer                       # from the repository root, a few seconds
    python -m bench.tokenizer --vocab-size 1024 --repeats 5

Figures: `build_vocab_s`, the median seconds of `write_tiny_vocab` (BPE training on the built-in corpus, then
writing qwen.tiktoken); `encode_chars_per_s`, characters per second encoding a mixed English, Chinese and
code text of about 100 kB with the tiny vocabulary (one thread, the median of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import device_name, emit, versions
from qwen.tiny_vocab import DEFAULT_VOCAB_SIZE, write_tiny_vocab
from qwen.tokenization_qwen import QWenTokenizer

TEXT = (
    "A photo of a red circle in the top left corner. What colour is the shape? "
    "这是什么？图片的左上角有一个红色的圆形。 "
    'def f(x):\n    return {"a": x ** 2}\n'
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    builds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            start = time.perf_counter()
            vocab = write_tiny_vocab(Path(tmp) / f"{i}.tiktoken", vocab_size=args.vocab_size)
            builds.append(time.perf_counter() - start)
        tokenizer = QWenTokenizer(vocab)
        text = TEXT * (100_000 // len(TEXT))
        tokenizer.encode(text)  # warm-up
        encodes = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n_tokens = len(tokenizer.encode(text))
            encodes.append(time.perf_counter() - start)
    record = {
        "bench": "tokenizer",
        "vocab_size": args.vocab_size,
        "build_vocab_s": round(statistics.median(builds), 3),
        "encode_chars_per_s": round(len(text) / statistics.median(encodes)),
        "encode_tokens": n_tokens,
        "device": device_name(torch.device("cpu")),
        **versions(),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
