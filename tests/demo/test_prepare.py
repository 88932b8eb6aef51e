"""The demo's preparation: the tiny CLIP's contrastive pretraining and the tiny vocabulary's answer words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from demo.pretrain import pretrain_clip, vocab_corpus
from qwen import QWenTokenizer
from qwen.tiny_vocab import write_tiny_vocab
from settings import DemoConfig
from visual import CLIPImagePreprocessor, write_tiny_clip_checkpoint
from visual.clip_tower import CLIPVisionTower


def test_every_answer_word_is_one_token(tmp_path: Path):
    """Like the real vocabulary, the demo's has the answer words whole: one 151936-way softmax per word."""
    from demo.synthetic import ATTRIBUTES

    tokenizer = QWenTokenizer(write_tiny_vocab(tmp_path / "qwen.tiktoken", vocab_size=1024, corpus=vocab_corpus()))
    for vocab in ATTRIBUTES.values():
        for word in vocab.values():
            for text in (word.en.split()[0], word.zh):  # "top left" is two words, "左上" one
                assert len(tokenizer.encode(text)) == 1, (text, tokenizer.encode(text))
    for word in ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "top",
                 "bottom", "left", "right"]:
        assert len(tokenizer.encode(" " + word)) == 1, word  # inside a sentence too
    for word in ["颜色", "形状", "位置", "图片", "这", "是", "什么"]:
        assert len(tokenizer.encode(word)) == 1, word


def test_clip_pretraining_learns_and_keeps_the_official_layout(tmp_path: Path):
    clip_dir = tmp_path / "clip"
    write_tiny_clip_checkpoint(clip_dir, image_size=56, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               seed=0, position_embedding_scale=12.0)
    before = load_file(clip_dir / "model.safetensors")
    config_before = json.loads((clip_dir / "config.json").read_text())
    demo = DemoConfig(image_size=56, clip_pretrain_steps=60, clip_pretrain_images_per_caption=2,
                      clip_pretrain_learning_rate=3e-3)

    losses = pretrain_clip(clip_dir, demo, log_every=1000)

    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5  # 64-way contrastive loss starts near ln 64 = 4.2
    after = load_file(clip_dir / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    assert json.loads((clip_dir / "config.json").read_text()) == config_before
    assert not torch.equal(after["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                           before["vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert not list(clip_dir.glob("*.partial"))

    # The project's strict loader reads the trained weights: its features are those of transformers' own
    # CLIPVisionModel given the saved vision weights by name.
    tower = CLIPVisionTower.from_pretrained(clip_dir, feature_layer=-2)
    pixels = CLIPImagePreprocessor.from_pretrained(clip_dir)([Image.new("RGB", (56, 56), (200, 30, 30))])
    reference = CLIPVisionModel(CLIPVisionConfig(**config_before["vision_config"])).eval()
    prefix = "vision_model."
    reference.load_state_dict({k[len(prefix):]: v for k, v in after.items() if k.startswith(prefix)})
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)
