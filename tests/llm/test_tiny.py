"""llm.tiny: the tiny Qwen2.5 / Qwen3 folders are in the published layouts, and transformers loads them whole."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm import Qwen2Tokenizer
from llm.tiny import (
    PUBLISHED_LAYOUTS,
    QWEN2_5_ADDED_TOKENS,
    random_qwen2_state_dict,
    tiny_qwen2_config,
    write_tiny_qwen2_checkpoint,
)
from qwen.fast_tokenizer import build_fast_tokenizer

# Published config.json fields (transformers 4.x files), by family.
QWEN2_5_FIELDS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_theta",
    "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
    "use_sliding_window", "vocab_size",
}
QWEN3_FIELDS = QWEN2_5_FIELDS | {"attention_bias", "head_dim", "rope_scaling"}
# repo: (model_type, tied, vocab_size, weight files)
EXPECTED = {
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", False, 152064, 4),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2", True, 151936, 1),
    "Qwen/Qwen3-8B": ("qwen3", False, 151936, 5),
    "Qwen/Qwen3-1.7B": ("qwen3", True, 151936, 2),
}


def _file_tensors(folder) -> tuple[dict[str, torch.Tensor], list[str]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return tensors, files


@pytest.fixture(scope="module", params=list(EXPECTED))
def written(request, tmp_path_factory):
    repo = request.param
    folder = write_tiny_qwen2_checkpoint(tmp_path_factory.mktemp("tiny") / repo.split("/")[1], repo, seed=5)
    return repo, folder


def test_transformers_loads_every_tensor_with_no_missing_or_unexpected_key(written):
    repo, folder = written
    model_type, tied, vocab_size, _ = EXPECTED[repo]
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    assert not info["error_msgs"]
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    tensors, _ = _file_tensors(folder)
    state = model.state_dict()
    wrong = [key for key, value in tensors.items() if not torch.equal(state[key], value)]
    assert not wrong  # loaded from the file, not initialised
    assert model.get_input_embeddings().weight.shape == (vocab_size, model.config.hidden_size)
    assert ("lm_head.weight" in tensors) == (not tied)
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares == tied
    if not tied:
        assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_config_is_the_published_one_with_tiny_sizes(written):
    repo, folder = written
    model_type, tied, vocab_size, _ = EXPECTED[repo]
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == (QWEN3_FIELDS if model_type == "qwen3" else QWEN2_5_FIELDS)
    assert list(config) == sorted(config)
    assert (config["model_type"], config["tie_word_embeddings"], config["vocab_size"]) == (model_type, tied, vocab_size)
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151645)
    assert config["torch_dtype"] == "float32" and config["use_sliding_window"] is False
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["num_hidden_layers"] == 2 and 32 <= config["hidden_size"] <= 64
    loaded = AutoConfig.from_pretrained(folder)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    if model_type == "qwen3":
        assert loaded.head_dim * loaded.num_attention_heads != loaded.hidden_size  # head_dim is its own field
    assert Qwen2Tokenizer.from_pretrained(folder).vocab_size < vocab_size  # the rows past the tokenizer pad
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643


def test_weight_files_and_index(written):
    repo, folder = written
    _, _, _, shards = EXPECTED[repo]
    tensors, files = _file_tensors(folder)
    weight_files = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    if shards == 1:
        assert weight_files == files == ["model.safetensors"]
        assert not (folder / "model.safetensors.index.json").exists()
    else:
        assert weight_files == files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in weight_files:
        assert os.stat(folder / name).st_mode & 0o644 == 0o644


def test_tokenizer_files(written):
    repo, folder = written
    family_tokens = 26 if "Qwen3" in repo else 22
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert sorted(map(int, decoder)) == list(range(151643, 151643 + family_tokens))
    assert [(decoder[str(151643 + i)]["content"], decoder[str(151643 + i)]["special"])
            for i in range(len(QWEN2_5_ADDED_TOKENS))] == list(QWEN2_5_ADDED_TOKENS)
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and "chat_template" in config
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert [(t["id"], t["content"], t["special"]) for t in tokenizer_json["added_tokens"]] == [
        (int(i), d["content"], d["special"]) for i, d in decoder.items()]
    # vocab.json + merges.txt are tokenizer.json's BPE again
    model = tokenizer_json["model"]
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == model["vocab"]
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and [m.split(" ") for m in merges[1:]] == model["merges"]
    assert model["ignore_merges"] is False


def test_vocab_and_merges_alone_give_the_same_ids(written, tmp_path):
    """transformers falls back on vocab.json + merges.txt when tokenizer.json is absent: same ids."""
    _, folder = written
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    text = "The sky is blue. 天空是蓝色的 <|im_end|> 😀  \n\n x"
    from_files = AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False, split_special_tokens=True)
    assert from_files["input_ids"] == Qwen2Tokenizer.from_pretrained(folder).encode_text(text)


def test_real_vocabulary_tokenizer_json(llm_real_qwen2_5_tokenizer_dir):
    model = json.loads((llm_real_qwen2_5_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(model["vocab"]) == 151643 and sorted(model["vocab"].values()) == list(range(151643))
    assert len(model["merges"]) == 151643 - 256


def test_same_seed_same_weights_and_options():
    config = tiny_qwen2_config("Qwen/Qwen3-8B", hidden_size=48, vocab_size=2048)
    a, b = random_qwen2_state_dict(config, seed=1), random_qwen2_state_dict(config, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 48)
    assert a["model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert not torch.equal(a["model.norm.weight"], torch.ones(48))  # norms perturbed: a missing one shows


def test_unknown_layout_and_field_are_refused(tmp_path):
    with pytest.raises(ValueError, match="known: Qwen/Qwen2.5-7B-Instruct"):
        write_tiny_qwen2_checkpoint(tmp_path / "x", "Qwen/Qwen2-7B")
    with pytest.raises(ValueError, match="unknown config.json fields.*head_dim"):
        tiny_qwen2_config("Qwen/Qwen2.5-7B-Instruct", head_dim=8)
    assert not (tmp_path / "x").exists()
    assert set(PUBLISHED_LAYOUTS) == set(EXPECTED)


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "tiny"
    with pytest.raises(FileNotFoundError):
        write_tiny_qwen2_checkpoint(target, "Qwen/Qwen2.5-1.5B-Instruct", vocab_file=tmp_path / "missing.tiktoken")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# qwen.fast_tokenizer.build_fast_tokenizer with a list of added tokens
# --------------------------------------------------------------------------------------------------


def test_build_fast_tokenizer_numbers_added_tokens_from_151643(tok_tiny_vocab_file):
    tokens = [AddedToken("<|a|>", special=True, normalized=False), AddedToken("<b>", special=False, normalized=False)]
    tokenizer = build_fast_tokenizer(tok_tiny_vocab_file, tokens)
    assert (tokenizer.token_to_id("<|a|>"), tokenizer.token_to_id("<b>")) == (151643, 151644)
    assert tokenizer.token_to_id("<|im_end|>") is None  # Qwen-7B's specials only by default
    # the special flag survives a round trip through the file
    reloaded = Tokenizer.from_str(tokenizer.to_str())
    assert [t.special for t in reloaded.get_added_tokens_decoder().values()] == [True, False]
    assert reloaded.decode([151643, 151644], skip_special_tokens=True) == "<b>"
    assert build_fast_tokenizer(tok_tiny_vocab_file).token_to_id("<|extra_204|>") == 151850  # the default list


def test_build_fast_tokenizer_refuses_clashing_added_tokens(tok_tiny_vocab_file):
    with pytest.raises(ValueError, match="listed twice"):
        build_fast_tokenizer(tok_tiny_vocab_file, [AddedToken("<x>", special=True)] * 2)
    with pytest.raises(ValueError, match="also ordinary tokens"):
        build_fast_tokenizer(tok_tiny_vocab_file, [AddedToken("a", special=True)])  # a single byte: in every vocabulary


def test_build_fast_tokenizer_ignore_merges_option(tok_tiny_vocab_file):
    def bpe(tokenizer: Tokenizer) -> dict:
        return json.loads(tokenizer.to_str())["model"]

    assert bpe(build_fast_tokenizer(tok_tiny_vocab_file))["ignore_merges"] is True
    assert bpe(build_fast_tokenizer(tok_tiny_vocab_file, ignore_merges=False))["ignore_merges"] is False
