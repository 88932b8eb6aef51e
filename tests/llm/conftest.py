"""Tiny Qwen2.5 / Qwen3 folders in the published layouts, and the real-vocabulary tokenizer files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm_tiny_qwen2_5_dir(tmp_path_factory):
    """A tiny Qwen/Qwen2.5-7B-Instruct folder: untied embeddings, 152064 rows, 4 shards, tiny vocabulary."""
    from llm.tiny import write_tiny_qwen2_checkpoint

    return write_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2.5") / "tiny-qwen2.5", "Qwen/Qwen2.5-7B-Instruct")


@pytest.fixture(scope="session")
def llm_tiny_qwen3_dir(tmp_path_factory):
    """A tiny Qwen/Qwen3-1.7B folder: tied embeddings, head_dim and q/k norms, 2 shards, tiny vocabulary."""
    from llm.tiny import write_tiny_qwen2_checkpoint

    return write_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", "Qwen/Qwen3-1.7B")


@pytest.fixture(scope="session")
def llm_real_qwen2_5_tokenizer_dir(tok_real_qwen2_tokenizer_dir):
    """Qwen2.5's tokenizer files built from the real qwen.tiktoken (about 15 s: the merges are rebuilt; shared with
    tests/model through tests/conftest.py)."""
    return tok_real_qwen2_tokenizer_dir("qwen2.5")
