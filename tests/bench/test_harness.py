"""The benchmarks' backbone pairs (bench/harness.py): the published architectures (parameter counts equal to the
published checkpoints'), the placeholder each family's tokenizer gives, and `bench.train_step` / `bench.generate`
running every tiny pair on the CPU. Nothing here is timed: the figures are the benchmarks' business."""

from __future__ import annotations

import math

import pytest
import torch

from bench import generate, train_step
from bench.harness import LLMS, VISIONS, build_random_vlm, count_llm_params, image_placeholder, image_tokens
from llm.tiny import published_layout

# Parameters of each published checkpoint: its model.safetensors.index.json `total_size` (bytes, bf16) / 2, every
# tensor once (tied embeddings are one tensor). Qwen-7B-Chat's is the figure docs/BENCHMARKS.md counts MFU with.
PUBLISHED_PARAMETERS = {
    "qwen-7b": 7_721_324_544,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("llm", sorted(PUBLISHED_PARAMETERS))
def test_the_published_architectures_have_the_published_parameter_counts(llm):
    model = build_random_vlm(llm, "siglip-so400m", torch.device("meta"), torch.bfloat16)
    assert count_llm_params(model) == PUBLISHED_PARAMETERS[llm]
    assert model.llm.config.tie_word_embeddings == (llm in ("qwen2.5-3b", "qwen2.5-1.5b"))


@pytest.mark.parametrize("vision,tokens,layers_run", [("clip-vit-l14", 256, 23), ("siglip-so400m", 729, 26)])
def test_the_towers_give_their_image_tokens_from_the_penultimate_layer(vision, tokens, layers_run):
    model = build_random_vlm("tiny-qwen", vision, torch.device("meta"), torch.bfloat16)
    assert model.vision_tower.num_patches == image_tokens(vision) == tokens
    assert model.vision_tower.num_layers_run == layers_run  # of 24 / 27: the last layer is never built
    assert model.projector.linear_1.in_features == VISIONS[vision].config["hidden_size"]


@pytest.mark.parametrize("llm,family,token,token_id", [
    ("qwen-7b", "qwen", "<|extra_0|>", 151646),
    ("qwen2.5-7b", "qwen2", "<|image_pad|>", 151655),
    ("qwen3-8b", "qwen2", "<|image_pad|>", 151655),
])
def test_the_placeholder_is_the_family_tokenizers(llm, family, token, token_id):
    assert image_placeholder(LLMS[llm]) == (token, token_id)
    model = build_random_vlm(llm, "tiny-siglip", torch.device("meta"), torch.bfloat16)
    assert (model.text_family.name, model.image_token, model.image_token_id) == (family, token, token_id)


@pytest.mark.parametrize("llm,repo", [("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"), ("qwen2.5-1.5b",
                                      "Qwen/Qwen2.5-1.5B-Instruct"), ("qwen3-8b", "Qwen/Qwen3-8B")])
def test_the_architectures_agree_with_the_published_layouts_of_llm_tiny(llm, repo):
    """The fields the harness writes out and llm/tiny.py's published config.json both have are equal."""
    spec, published = LLMS[llm].config, published_layout(repo).config
    shared = set(spec) & set(published)
    assert {"model_type", "vocab_size", "tie_word_embeddings", "rope_theta", "max_position_embeddings"} <= shared
    assert {k: spec[k] for k in shared} == {k: published[k] for k in shared}


# (llm, vision, image tokens, trainable parameters: LoRA r=64 on the family's default targets + the projector)
# tiny-qwen: hidden 64, 2 layers, MLP 128; c_attn 64*(64+192) + c_proj (attention) 64*(64+64) + w1, w2 64*(64+128)
#   each + c_proj (MLP) 64*(128+64) = 61,440 a layer; projector 64*64+64 + 64*64+64 = 8,320 -> 131,200
# tiny-qwen2.5: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128: q, o 64*(64+64); k, v 64*(64+32);
#   gate, up, down 64*(64+128) -> 65,536 a layer; projector 8,320 -> 139,392
# tiny-qwen3: hidden 32, 4 heads of 16 (64 wide), 2 KV heads, MLP 64: q, o 64*(32+64); k, v 64*(32+32); gate, up,
#   down 64*(32+64) -> 38,912 a layer; projector 64*32+32 + 32*32+32 = 3,136 -> 80,960
TINY_PAIRS = [("tiny-qwen", "tiny-clip", 256, 131_200), ("tiny-qwen2.5", "tiny-siglip", 729, 139_392),
              ("tiny-qwen3", "tiny-siglip", 729, 80_960)]


@pytest.mark.parametrize("llm,vision,tokens,trainable", TINY_PAIRS, ids=[f"{p[0]}+{p[1]}" for p in TINY_PAIRS])
def test_train_step_runs_each_tiny_pair(llm, vision, tokens, trainable, capsys):
    record = train_step.main(["--llm", llm, "--vision", vision, "--device", "cpu", "--batch-size", "1",
                              "--steps", "1", "--warmup", "0"])
    config = record["config"]
    assert (config["llm"], config["vision"], config["image_tokens"]) == (llm, vision, tokens)
    assert config["seq_len"] == 10 + tokens + 246  # 512 with CLIP's 256 image tokens, as before
    assert config["trainable_params"] == trainable
    vocab = LLMS[llm].config.get("vocab_size", 151936)
    assert abs(record["final_loss"] - math.log(vocab)) < 0.1  # random weights: about uniform over the vocabulary
    assert record["mfu"] is None  # no bf16 peak on a CPU
    assert f'"llm": "{llm}"' in capsys.readouterr().out  # the one JSON line


def test_generate_runs_a_qwen3_siglip_pair_and_size_keeps_its_pair():
    argv = ["--device", "cpu", "--batch-sizes", "1", "--new-tokens", "2", "--repeats", "1"]
    record = generate.main(["--llm", "tiny-qwen3", "--vision", "tiny-siglip", *argv])
    assert (record["config"]["prompt_len"], record["config"]["image_tokens"]) == (729 + 64, 729)
    assert record["batch_1"]["decode_tokens_per_s"] > 0
    record = generate.main(["--size", "tiny", *argv])
    assert (record["config"]["llm"], record["config"]["vision"], record["config"]["prompt_len"]) == (
        "tiny-qwen", "tiny-clip", 320)


@pytest.mark.parametrize("module,argv,message", [
    (train_step, ["--size", "tiny", "--llm", "tiny-qwen3"], "give either --size or --llm/--vision, not both"),
    (generate, ["--size", "7b", "--vision", "siglip-so400m"], "give either --size or --llm/--vision, not both"),
    (train_step, ["--vision", "siglip-so400m", "--seq-len", "512"],
     "--seq-len 512 leaves no text after 10 prompt tokens and the 729 image tokens of siglip-so400m: give at least "
     "740"),
    (generate, ["--vision", "tiny-siglip", "--prompt-len", "320"], "--prompt-len 320 leaves no text"),
])
def test_bad_backbone_arguments_are_one_message_before_any_model_is_built(module, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(module, "build_random_vlm", lambda *a: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
