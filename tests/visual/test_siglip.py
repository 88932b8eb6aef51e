"""visual.siglip_tower and visual.tiny_siglip: tower parity with transformers' SiglipVisionModel (every patch, no
CLS), layers not run are not built, freezing, loading from a full SiglipModel, a saved SiglipVisionModel and
shards, loud loading, the image-processor fit, the token count for an image size that is not a multiple of the
patch, and the tiny checkpoint in the published layout."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

import visual.tiny_siglip
from visual import CheckpointError, ImagePreprocessor, SiglipVisionTower, write_tiny_siglip_checkpoint

from .test_image_preprocessor import SO400M_PREPROCESSOR_CONFIG

IMAGE_SIZE, PATCH_SIZE, HIDDEN, LAYERS = 56, 14, 32, 3
ODD_SIZE = 50  # not a multiple of 14: the patch convolution drops the last 8 pixel rows and columns


def write(folder, **kwargs):
    settings = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=HIDDEN, num_hidden_layers=LAYERS, seed=3)
    return write_tiny_siglip_checkpoint(folder, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    return write(tmp_path_factory.mktemp("siglip") / "tiny-siglip-50", image_size=ODD_SIZE)


def pixels_for(size, n=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def reference_hidden_states(folder, pixels):
    reference = SiglipVisionModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return reference(pixel_values=pixels, output_hidden_states=True).hidden_states


# ---------------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1])
def test_tower_features_equal_hidden_states_of_siglip_vision_model(ckpt, feature_layer):
    pixels = pixels_for(IMAGE_SIZE)
    hidden_states = reference_hidden_states(ckpt, pixels)
    assert len(hidden_states) == LAYERS + 1
    tower = SiglipVisionTower.from_pretrained(ckpt, feature_layer=feature_layer)

    features = tower(pixels)

    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert features.shape == (3, num_patches, HIDDEN) == (3, tower.num_patches, tower.hidden_size)
    assert (features - hidden_states[feature_layer]).abs().max().item() <= 1e-6  # every patch: no CLS to drop
    # the layers are different (the test would pass trivially if all hidden states were alike)
    assert (hidden_states[-1] - hidden_states[-2]).abs().max() > 0.1


@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_image_size_not_a_multiple_of_the_patch(odd_ckpt, feature_layer):
    pixels = pixels_for(ODD_SIZE)
    tower = SiglipVisionTower.from_pretrained(odd_ckpt, feature_layer=feature_layer)
    assert tower.num_patches == (ODD_SIZE // PATCH_SIZE) ** 2 == 9
    features = tower(pixels)
    assert features.shape == (3, 9, HIDDEN)
    assert (features - reference_hidden_states(odd_ckpt, pixels)[feature_layer]).abs().max().item() <= 1e-6
    # the dropped border does not count: changing it changes nothing
    border = pixels.clone()
    border[:, :, 42:, :] = 7.0
    border[:, :, :, 42:] = -7.0
    assert torch.equal(tower(border), features)


def test_so400m_token_count_without_weights(tmp_path):
    """The published config: 384 px, patch 14 -> 27 x 27 = 729 tokens (384 = 27 * 14 + 6)."""
    from visual import num_image_tokens, vision_config

    config = tiny_config_json(image_size=384, patch_size=14, hidden_size=1152)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert SiglipVisionTower.num_image_tokens(SiglipVisionTower.vision_config(tmp_path)) == 729
    assert num_image_tokens(vision_config(tmp_path)) == 729
    for image_size, patch_size in [(10, 14), (384, 0)]:
        with pytest.raises(ValueError, match="patch_size"):
            SiglipVisionTower.num_image_tokens(SiglipVisionConfig(image_size=image_size, patch_size=patch_size))


def tiny_config_json(**vision):
    config = visual.tiny_siglip.tiny_siglip_config(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4)
    config["vision_config"].update(vision)
    return config


def test_tower_builds_only_the_layers_it_runs(ckpt):
    assert len(SiglipVisionTower.from_pretrained(ckpt, feature_layer=-2).layers) == LAYERS - 1
    assert len(SiglipVisionTower.from_pretrained(ckpt, feature_layer=-1).layers) == LAYERS
    assert len(SiglipVisionTower.from_pretrained(ckpt, feature_layer=0).layers) == 0
    tower = SiglipVisionTower.from_pretrained(ckpt)
    names = [name for name, _ in tower.named_modules()]
    assert not any("post_layernorm" in name or "head" in name for name in names), names
    assert tower.feature_layer == -2 and tower.config.num_hidden_layers == LAYERS  # the checkpoint's config
    assert (tower.image_size, tower.patch_size) == (IMAGE_SIZE, PATCH_SIZE)
    for bad in (LAYERS + 1, -(LAYERS + 2)):
        with pytest.raises(ValueError, match="feature_layer"):
            SiglipVisionTower.from_pretrained(ckpt, feature_layer=bad)


def test_tower_is_frozen_stays_in_eval_and_casts(ckpt):
    tower = SiglipVisionTower.from_pretrained(ckpt)
    parent = nn.ModuleDict({"tower": tower, "projector": nn.Linear(HIDDEN, 8)})
    parent.train()
    assert parent["projector"].training and not any(m.training for m in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())
    x = pixels_for(IMAGE_SIZE).requires_grad_(True)
    with torch.enable_grad():
        features = tower(x)
    assert not features.requires_grad and features.grad_fn is None

    bf16 = SiglipVisionTower.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert tower.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and tower.device.type == "cpu"
    out = bf16(x.detach())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), features, atol=0.1, rtol=0.05)
    with pytest.raises(AssertionError, match=rf"pixel_values must be \[N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}\]"):
        tower(pixels_for(ODD_SIZE))


# ---------------------------------------------------------------------------------------------------
# Folders: full SiglipModel (sharded too), saved SiglipVisionModel


def test_loads_shards_written_by_the_tiny_writer(ckpt, tmp_path):
    sharded = write(tmp_path / "sharded", max_shard_size=30_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(load_file(ckpt / "model.safetensors"))
    pixels = pixels_for(IMAGE_SIZE)
    assert torch.equal(SiglipVisionTower.from_pretrained(sharded)(pixels),
                       SiglipVisionTower.from_pretrained(ckpt)(pixels))

    (sharded / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {re.escape(shards[-1])} .* is missing"):
        SiglipVisionTower.from_pretrained(sharded)


def test_loads_a_saved_siglip_vision_model(ckpt, tmp_path):
    """A vision-only folder (model_type siglip_vision_model) as transformers' save_pretrained writes it."""
    SiglipVisionModel.from_pretrained(ckpt, local_files_only=True).save_pretrained(tmp_path / "vision")
    shutil.copy(ckpt / "preprocessor_config.json", tmp_path / "vision")
    assert json.loads((tmp_path / "vision" / "config.json").read_text())["model_type"] == "siglip_vision_model"
    pixels = pixels_for(IMAGE_SIZE)
    expected = SiglipVisionTower.from_pretrained(ckpt)(pixels)
    assert torch.equal(SiglipVisionTower.from_pretrained(tmp_path / "vision")(pixels), expected)


# ---------------------------------------------------------------------------------------------------
# Loud loading


def test_error_mis_shaped_missing_and_unexpected_tensor(ckpt, tmp_path):
    folder = shutil.copytree(ckpt, tmp_path / "copy")
    good = load_file(folder / "model.safetensors")

    for name in ("vision_model.encoder.layers.2.mlp.fc1.weight", "vision_model.head.probe",
                 "vision_model.post_layernorm.weight"):
        broken = {k: v for k, v in good.items() if k != name}
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=rf"SigLIP checkpoint {folder}: missing tensor {re.escape(name)} "):
            SiglipVisionTower.from_pretrained(folder)

    name = "vision_model.embeddings.position_embedding.weight"
    save_file(dict(good, **{name: torch.zeros(9, HIDDEN)}), folder / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=rf"{folder}: tensor {name} .*shape \[9, {HIDDEN}\].*needs \[16, {HIDDEN}\]"):
        SiglipVisionTower.from_pretrained(folder)

    save_file(dict(good, **{"vision_model.embeddings.class_embedding": torch.zeros(HIDDEN)}),
              folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor vision_model\.embeddings\.class_embedding"):
        SiglipVisionTower.from_pretrained(folder)

    # the text tower, logit scale and bias are not needed: dropping them is fine
    save_file({k: v for k, v in good.items() if k.startswith("vision_model.")}, folder / "model.safetensors")
    SiglipVisionTower.from_pretrained(folder)


def test_error_missing_folder_config_weights_and_other_family(ckpt, tiny_clip_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"SigLIP checkpoint folder .*nowhere does not exist"):
        SiglipVisionTower.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"model_type 'clip', expected 'siglip' or 'siglip_vision_model'"):
        SiglipVisionTower.from_pretrained(tiny_clip_dir)

    folder = shutil.copytree(ckpt, tmp_path / "copy")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # never opened
    with pytest.raises(CheckpointError, match=r"SigLIP checkpoint .* only pickled weights \(pytorch_model\.bin\)"):
        SiglipVisionTower.from_pretrained(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=rf"{folder}: no weights file"):
        SiglipVisionTower.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{folder}: config\.json is missing"):
        SiglipVisionTower.from_pretrained(folder)


@pytest.mark.parametrize("change,message", [
    ({"size": {"height": 28, "width": 28}}, "makes images 28x28, but the tower (config.json image_size) takes 56x56"),
    ({"size": {"height": 56, "width": 48}}, "makes images 56x48"),
    ({"do_center_crop": True, "crop_size": 42}, "makes images 42x42"),
    ({"do_resize": False}, "does not resize"),
    ({"image_processor_type": "CLIPImageProcessor", "size": 56, "do_center_crop": True, "crop_size": 56},
     "resizes the shortest edge"),
    ({"size": 56}, "size=56 is not supported for SigLIP"),
])
def test_a_processor_that_does_not_fit_the_tower_fails_at_load(ckpt, tmp_path, change, message):
    folder = shutil.copytree(ckpt, tmp_path / "copy")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=rf"SigLIP checkpoint {folder}: .*{re.escape(message)}"):
        SiglipVisionTower.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        SiglipVisionTower.image_preprocessor(folder)


def test_the_towers_own_processor(ckpt, tmp_path):
    processor = SiglipVisionTower.image_preprocessor(ckpt)
    assert processor == ImagePreprocessor.from_dict(dict(SO400M_PREPROCESSOR_CONFIG, size={"height": 56, "width": 56}))
    assert processor.output_size == (IMAGE_SIZE, IMAGE_SIZE) and not processor.do_center_crop
    folder = shutil.copytree(ckpt, tmp_path / "copy")
    (folder / "preprocessor_config.json").unlink()
    SiglipVisionTower.from_pretrained(folder)  # the tower itself needs no processor file
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json is missing"):
        SiglipVisionTower.image_preprocessor(folder)


# ---------------------------------------------------------------------------------------------------
# Tiny checkpoint writer


def test_tiny_checkpoint_is_a_real_siglip_model_checkpoint(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["SiglipModel"] and config["model_type"] == "siglip"
    assert config["vision_config"] == {"hidden_size": HIDDEN, "image_size": IMAGE_SIZE, "intermediate_size": 64,
                                       "model_type": "siglip_vision_model", "num_attention_heads": 4,
                                       "num_hidden_layers": LAYERS, "patch_size": PATCH_SIZE}
    assert config["text_config"]["model_type"] == "siglip_text_model"
    assert json.loads((ckpt / "preprocessor_config.json").read_text()) == dict(
        SO400M_PREPROCESSOR_CONFIG, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    model, info = SiglipModel.from_pretrained(ckpt, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # every key used, none missing or mis-shaped
    assert isinstance(model.config, SiglipConfig) and model.config.vision_config.vision_use_head
    stored = load_file(ckpt / "model.safetensors")
    assert set(stored) == set(model.state_dict())
    for key in ("vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.2.mlp.fc2.weight",
                "vision_model.post_layernorm.weight", "vision_model.head.probe",
                "vision_model.head.attention.in_proj_weight", "text_model.embeddings.token_embedding.weight",
                "text_model.head.weight", "logit_scale", "logit_bias"):
        assert key in stored, key
    assert torch.equal(model.vision_model.head.probe, stored["vision_model.head.probe"])
    assert all(t.dtype == torch.float32 for t in stored.values())


def test_tiny_writer_is_deterministic_and_never_half_written(tmp_path, monkeypatch):
    a, b, c = write(tmp_path / "a", seed=7), write(tmp_path / "b", seed=7), write(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    target = tmp_path / "crash"
    monkeypatch.setattr(visual.tiny_siglip, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        write(target, max_shard_size=30_000)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # neither the target nor a staging folder
    with pytest.raises(FileExistsError):
        write(a)
