"""Shared fixtures: tiny files in the official formats, built in temporary folders."""

from __future__ import annotations

import base64

import pytest


@pytest.fixture(scope="session")
def byte_vocab_file(tmp_path_factory):
    """A minimal valid qwen.tiktoken: the 256 single bytes as ranks 0..255 (enough for model-only tests)."""
    path = tmp_path_factory.mktemp("vocab") / "qwen.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path
