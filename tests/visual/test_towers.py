"""visual.towers: the folder's config.json model_type picks the tower (CLIP or SigLIP) and anything else is one
CheckpointError naming the folder, the model_type and the supported ones; the image-token count, the vision
config, the checkpoint check and the image processor for either family."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import CLIPTextConfig, CLIPVisionConfig, SiglipVisionConfig

from visual import (
    CheckpointError,
    CLIPVisionTower,
    SiglipVisionTower,
    inspect_vision_checkpoint,
    load_image_preprocessor,
    load_vision_tower,
    num_image_tokens,
    vision_config,
    vision_family,
    write_tiny_siglip_checkpoint,
)
from visual.towers import TOWERS, supported_model_types, vision_tower_class


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return write_tiny_siglip_checkpoint(tmp_path_factory.mktemp("siglip") / "tiny-siglip", image_size=42, seed=1)


def config_only(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_folder_picks_its_tower(tiny_clip_dir, siglip_dir):
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    clip = load_vision_tower(tiny_clip_dir, feature_layer=-1)
    assert type(clip) is CLIPVisionTower and vision_family(tiny_clip_dir) == "clip"
    assert torch.equal(clip(pixels), CLIPVisionTower.from_pretrained(tiny_clip_dir, feature_layer=-1)(pixels))
    assert clip.num_patches == num_image_tokens(vision_config(tiny_clip_dir)) == 16

    siglip = load_vision_tower(siglip_dir, dtype=torch.bfloat16)
    assert type(siglip) is SiglipVisionTower and vision_family(siglip_dir) == "siglip"
    assert siglip.dtype == torch.bfloat16 and siglip.feature_layer == -2
    assert siglip.num_patches == num_image_tokens(vision_config(siglip_dir)) == 9

    config, files, found = inspect_vision_checkpoint(siglip_dir)
    assert isinstance(config, SiglipVisionConfig) and [f.name for f in files] == ["model.safetensors"]
    assert "head.probe" in found and not any(name.startswith("text_model") for name in found)
    config, _, found = inspect_vision_checkpoint(tiny_clip_dir)
    assert isinstance(config, CLIPVisionConfig) and "embeddings.class_embedding" in found

    assert load_image_preprocessor(siglip_dir).size == (42, 42)
    assert load_image_preprocessor(tiny_clip_dir).crop_size == (56, 56)
    assert (CLIPVisionTower.feature_select_strategy, SiglipVisionTower.feature_select_strategy) == ("default", "full")


@pytest.mark.parametrize("model_type,tower", [
    ("clip", CLIPVisionTower), ("clip_vision_model", CLIPVisionTower),
    ("siglip", SiglipVisionTower), ("siglip_vision_model", SiglipVisionTower),
])
def test_every_model_type_of_each_family(tmp_path, model_type, tower):
    sizes = {"image_size": 42, "patch_size": 14}
    config = {"model_type": model_type, **({"vision_config": sizes} if "_" not in model_type else sizes)}
    folder = config_only(tmp_path / model_type, config)
    assert vision_tower_class(folder) is tower
    assert isinstance(vision_config(folder), tower.config_class)
    assert num_image_tokens(vision_config(folder)) == 9


@pytest.mark.parametrize("config", [{"model_type": "dinov2"}, {"model_type": "siglip2"}, {"hidden_size": 4}])
def test_an_unknown_model_type_is_one_clear_error(tmp_path, config):
    folder = config_only(tmp_path / "other", config)
    found = repr(config.get("model_type"))
    message = (f"vision checkpoint {folder}: config.json has model_type {found}, which is not a supported vision "
               f"tower (supported: clip, clip_vision_model, siglip, siglip_vision_model)")
    for call in (vision_family, load_vision_tower, inspect_vision_checkpoint, vision_config, load_image_preprocessor):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            call(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist \(weights load from local folders only\)"):
        load_vision_tower(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: config\.json is missing"):
        vision_family(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        vision_family(tmp_path / "empty")


def test_token_count_rules_per_family():
    # SigLIP floors (so400m: 384 px, patch 14 -> 729); CLIP keeps refusing a size that is not a multiple
    assert num_image_tokens(SiglipVisionConfig(image_size=384, patch_size=14)) == 729
    assert num_image_tokens(CLIPVisionConfig(image_size=336, patch_size=14)) == 576
    with pytest.raises(ValueError, match="not a multiple"):
        num_image_tokens(CLIPVisionConfig(image_size=384, patch_size=14))
    with pytest.raises(ValueError, match=r"CLIPTextConfig is not the vision config of a supported tower"):
        num_image_tokens(CLIPTextConfig())


def test_registry():
    assert supported_model_types() == ["clip", "clip_vision_model", "siglip", "siglip_vision_model"]
    assert [tower.family for tower in TOWERS] == ["clip", "siglip"]
