"""visual: tower parity with transformers' CLIPVisionModel, freezing, loud loading, the tiny checkpoint
format, preprocessing parity with CLIPImageProcessorPil, image modes and EXIF through load_image and the
preprocessor."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import visual.tiny_clip
from visual import (
    CheckpointError,
    CLIPVisionTower,
    ImageLoadError,
    ImagePreprocessor,
    load_image,
    write_tiny_clip_checkpoint,
)
from visual.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGE_SIZE, PATCH_SIZE, HIDDEN, LAYERS = 112, 14, 64, 3
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64

# The real openai/clip-vit-large-patch14 preprocessor_config.json, verbatim.
OPENAI_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_clip_checkpoint(
        tmp_path_factory.mktemp("clip") / "tiny-clip",
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        seed=3,
    )


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def copy_checkpoint(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "copy")


def uniform_expected(rgb, size):
    """(c / 255 - mean) / std for each channel, computed in float64 by hand: [3, size, size]."""
    values = [(c / 255 - m) / s for c, m, s in zip(rgb, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    return torch.tensor(values, dtype=torch.float64)[:, None, None].expand(3, size, size)


# ---------------------------------------------------------------------------------------------------
# Vision tower


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_tower_features_equal_hidden_states_of_full_clip_vision_model(ckpt, pixels, feature_layer):
    tower = CLIPVisionTower.from_pretrained(ckpt, feature_layer=feature_layer)
    reference = CLIPVisionModel.from_pretrained(ckpt, local_files_only=True).eval()
    with torch.no_grad():
        hidden_states = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden_states) == LAYERS + 1
    expected = hidden_states[feature_layer][:, 1:]  # CLS dropped

    features = tower(pixels)

    assert features.shape == (3, NUM_PATCHES, HIDDEN) == (3, tower.num_patches, tower.hidden_size)
    assert (features - expected).abs().max().item() <= 1e-6
    # the layers are different (the test would pass trivially if all hidden states were alike)
    assert (hidden_states[-1][:, 1:] - hidden_states[-2][:, 1:]).abs().max() > 0.1


def test_tower_runs_only_the_layers_it_needs(ckpt):
    assert len(CLIPVisionTower.from_pretrained(ckpt, feature_layer=-2).layers) == LAYERS - 1
    assert len(CLIPVisionTower.from_pretrained(ckpt, feature_layer=-1).layers) == LAYERS
    assert len(CLIPVisionTower.from_pretrained(ckpt, feature_layer=0).layers) == 0
    tower = CLIPVisionTower.from_pretrained(ckpt)
    assert not any("post_layernorm" in name for name, _ in tower.named_modules())
    assert tower.feature_layer == -2
    assert tower.config.num_hidden_layers == LAYERS  # the checkpoint's config, untouched
    assert (tower.image_size, tower.patch_size, tower.num_patches) == (IMAGE_SIZE, PATCH_SIZE, NUM_PATCHES)
    for bad in (LAYERS + 1, -(LAYERS + 2)):
        with pytest.raises(ValueError, match="feature_layer"):
            CLIPVisionTower.from_pretrained(ckpt, feature_layer=bad)


def test_tower_is_frozen_and_stays_in_eval(ckpt, pixels):
    tower = CLIPVisionTower.from_pretrained(ckpt)
    parent = nn.ModuleDict({"tower": tower, "projector": nn.Linear(HIDDEN, 8)})
    parent.train()
    assert parent["projector"].training
    assert not any(m.training for m in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())

    x = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        features = tower(x)
    assert not features.requires_grad and features.grad_fn is None
    # and the projector on top still trains
    parent["projector"](features).sum().backward()
    assert parent["projector"].weight.grad is not None


def test_tower_dtype(ckpt, pixels):
    fp32 = CLIPVisionTower.from_pretrained(ckpt)
    bf16 = CLIPVisionTower.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    out = bf16(pixels)  # float32 pixels are cast
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), fp32(pixels), atol=0.1, rtol=0.05)


def test_tower_loads_sharded_safetensors_and_ignores_old_position_ids(ckpt, pixels, tmp_path):
    folder = copy_checkpoint(ckpt, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    # older exports of openai/clip-* also store this buffer, in a third shard here
    extra = {"vision_model.embeddings.position_ids": torch.arange(NUM_PATCHES + 1)[None]}
    save_file(extra, folder / "model-extra.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(extra, "model-extra.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    sharded = CLIPVisionTower.from_pretrained(folder)
    assert torch.equal(sharded(pixels), CLIPVisionTower.from_pretrained(ckpt)(pixels))

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002\.safetensors .* is missing"):
        CLIPVisionTower.from_pretrained(folder)


# Keys that transformers 4.16 wrote into every sub-config of openai/clip-vit-* config.json files.
LEGACY_SUBCONFIG_KEYS = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
    "temperature": 1.0, "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
    "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
    "transformers_version": "4.16.0.dev0", "use_bfloat16": False,
}  # fmt: skip


def test_tower_loads_legacy_config_json(ckpt, pixels, tmp_path):
    """The official config.json was written by transformers 4.16: every generation default in each
    sub-config, `*_config_dict: null` blocks, `transformers_version: null`."""
    folder = copy_checkpoint(ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for sub in ("text_config", "vision_config"):
        config[sub] = dict(LEGACY_SUBCONFIG_KEYS, **config[sub])
    config.update(text_config_dict=None, vision_config_dict=None, transformers_version=None)
    config["_name_or_path"] = "openai/clip-vit-large-patch14"
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    tower = CLIPVisionTower.from_pretrained(folder)
    assert tower.config.num_hidden_layers == LAYERS
    assert torch.equal(tower(pixels), CLIPVisionTower.from_pretrained(ckpt)(pixels))


# ---------------------------------------------------------------------------------------------------
# Loud loading


def test_error_missing_folder_config_and_weights(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*does not exist"):
        CLIPVisionTower.from_pretrained(tmp_path / "nowhere")

    folder = copy_checkpoint(ckpt, tmp_path)
    (folder / "config.json").rename(folder / "config.json.bak")
    with pytest.raises(CheckpointError, match=rf"{folder}.*config\.json is missing"):
        CLIPVisionTower.from_pretrained(folder)
    (folder / "config.json.bak").rename(folder / "config.json")

    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # contents don't matter: never opened
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model\.bin\).*[Cc]onvert"):
        CLIPVisionTower.from_pretrained(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=rf"{folder}: no weights file"):
        CLIPVisionTower.from_pretrained(folder)


def test_error_mis_shaped_missing_and_unexpected_tensor(ckpt, tmp_path):
    folder = copy_checkpoint(ckpt, tmp_path)
    good = load_file(folder / "model.safetensors")
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"

    broken = dict(good)
    broken[name] = torch.zeros(7, HIDDEN)
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{folder}: tensor {name} .*shape \[7, {HIDDEN}\]"):
        CLIPVisionTower.from_pretrained(folder)

    broken = {k: v for k, v in good.items() if k != name}
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{folder}: missing tensor {name}"):
        CLIPVisionTower.from_pretrained(folder)

    broken = dict(good, **{"vision_model.encoder.layers.9.mlp.fc1.weight": torch.zeros(2)})
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor vision_model\.encoder\.layers\.9"):
        CLIPVisionTower.from_pretrained(folder)

    # the text tower is not needed: dropping it is fine
    save_file({k: v for k, v in good.items() if k.startswith("vision_model.")}, folder / "model.safetensors")
    CLIPVisionTower.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------
# Tiny checkpoint writer


def test_tiny_checkpoint_is_a_real_clip_model_checkpoint(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["model_type"] == "clip"
    assert {"text_config", "vision_config", "projection_dim", "logit_scale_init_value"} <= set(config)
    assert config["vision_config"]["image_size"] == IMAGE_SIZE
    assert json.loads((ckpt / "preprocessor_config.json").read_text()) == dict(
        OPENAI_PREPROCESSOR_CONFIG, size=IMAGE_SIZE, crop_size=IMAGE_SIZE
    )
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]

    model, info = CLIPModel.from_pretrained(ckpt, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # every key used, none missing or mis-shaped
    stored = load_file(ckpt / "model.safetensors")
    assert set(stored) == set(model.state_dict())
    for key in (
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.post_layernorm.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.weight",
        "visual_projection.weight",
        "text_projection.weight",
        "logit_scale",
    ):
        assert key in stored, key
    patch = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight, stored[patch])
    assert all(t.dtype == torch.float32 for t in stored.values())


def test_tiny_writer_is_deterministic_and_scales_position_embeddings(tmp_path):
    a = write_tiny_clip_checkpoint(tmp_path / "a", seed=7)
    b = write_tiny_clip_checkpoint(tmp_path / "b", seed=7)
    c = write_tiny_clip_checkpoint(tmp_path / "c", seed=8)
    scaled = write_tiny_clip_checkpoint(tmp_path / "d", seed=7, position_embedding_scale=4.0)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    base, big = load_file(a / "model.safetensors"), load_file(scaled / "model.safetensors")
    pos = "vision_model.embeddings.position_embedding.weight"
    assert torch.allclose(big[pos], 4.0 * base[pos])
    assert all(torch.equal(base[k], big[k]) for k in base if k != pos)


def test_tiny_writer_never_leaves_a_half_written_folder(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(visual.tiny_clip, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tiny_clip_checkpoint(target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging folder
    monkeypatch.undo()

    write_tiny_clip_checkpoint(target)
    with pytest.raises(FileExistsError):
        write_tiny_clip_checkpoint(target)
    write_tiny_clip_checkpoint(target, seed=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocessing_matches_transformers_pil_processor():
    ours = ImagePreprocessor.from_dict(OPENAI_PREPROCESSOR_CONFIG)
    ref_kwargs = {k: v for k, v in OPENAI_PREPROCESSOR_CONFIG.items() if k != "feature_extractor_type"}
    reference = CLIPImageProcessorPil(**ref_kwargs)
    rng = np.random.default_rng(0)
    worst = 0.0
    for width, height in [(224, 224), (640, 480), (480, 640), (301, 300), (1000, 123), (50, 37), (223, 225)]:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # hardest case for rounding
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
        images = [Image.fromarray(noise), Image.fromarray(ramp)]
        got = ours(images)
        expected = torch.as_tensor(reference(images=images, return_tensors="pt")["pixel_values"])
        assert got.shape == expected.shape == (2, 3, 224, 224) and got.dtype == torch.float32
        worst = max(worst, (got - expected).abs().max().item())
    assert worst <= 1e-5, worst


def test_preprocessing_uniform_colour_is_normalised_constant():
    colour = (200, 30, 90)
    image = Image.new("RGB", (97, 61), colour)
    got = ImagePreprocessor(size=32, crop_size=32)([image])[0]
    assert got.shape == (3, 32, 32)
    assert torch.allclose(got.double(), uniform_expected(colour, 32), atol=1e-6, rtol=0)


def test_center_crop_geometry_by_hand():
    # 5 x 7 image whose red channel numbers the pixels; crop 3 x 4 without resizing: rows 1..3, cols 1..4
    index = np.arange(35, dtype=np.uint8).reshape(5, 7)
    image = Image.fromarray(np.stack([index, index, index], axis=-1))
    pre = ImagePreprocessor(crop_size=(3, 4), do_resize=False, do_rescale=False, do_normalize=False)
    assert pre([image])[0, 0].tolist() == index[1:4, 1:5].astype(float).tolist()
    # resize rounding: the long edge is floored (int(32 * 97 / 61) = 50)
    assert ImagePreprocessor(size=32).resized_size(97, 61) == (50, 32)
    assert ImagePreprocessor(size=32).resized_size(61, 97) == (32, 50)


@pytest.mark.parametrize("settings", [
    {},  # CLIP: shortest edge 224, crop 224
    {"size": 256, "crop_size": 224},  # the crop takes less than the resized short edge
    {"size": 57, "crop_size": 56},  # ... by an odd number of pixels
    {"size": 56, "crop_size": (41, 64)},  # crop wider than the short edge of landscape images, narrower in portrait
    {"size": 32, "crop_size": 48},  # crop larger than the resized image: padded
    {"crop_size": (30, 20), "do_resize": False},
    {"size": 40, "do_center_crop": False},
])
def test_a_shrunk_image_preprocesses_to_exactly_the_pixels_of_the_original(settings):
    pre = ImagePreprocessor(**settings)
    crop_height, crop_width = pre.crop_size
    rng = np.random.default_rng(0)
    for width, height in [(1200, 900), (900, 1201), (225, 224), (224, 224), (57, 56), (100, 50), (3, 700),
                          (31, 29), (641, 2)]:
        original = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))  # noise: any shift shows
        kept = pre.shrink(original)
        assert kept.mode == "RGB"
        assert np.array_equal(pre.preprocess_image(kept), pre.preprocess_image(original)), (settings, width, height)
        if pre.do_resize and pre.do_center_crop:  # no more than what preprocessing reads, resized
            side = max(pre.size, crop_height, crop_width)
            assert kept.width <= side and kept.height <= side, (settings, width, height, kept.size)
        elif pre.do_center_crop:
            assert kept.size == (min(width, crop_width), min(height, crop_height))
    grey = Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), mode="L")
    assert np.array_equal(pre.preprocess_image(pre.shrink(grey)), pre.preprocess_image(grey))


def test_load_image_refuses_more_pixels_than_asked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (9, 9, 9)).save(path)
    path.write_bytes(path.read_bytes()[:60])  # the header says 300 x 200; the pixel data is cut off
    with pytest.raises(ImageLoadError) as err:
        load_image(path, max_pixels=300 * 200 - 1)
    assert err.value.reason == "too large" and err.value.detail == "300x200 is over 59,999 pixels"
    with pytest.raises(ImageLoadError) as err:
        load_image(path, max_pixels=300 * 200)  # allowed: decoding it finds the damage
    assert err.value.reason == "corrupt"


def test_preprocessor_config_formats(tmp_path):
    old = ImagePreprocessor.from_dict(OPENAI_PREPROCESSOR_CONFIG)
    new = ImagePreprocessor.from_dict(
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": OPENAI_CLIP_STD,
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 224},
        }
    )
    assert old == new == ImagePreprocessor()

    path = tmp_path / "preprocessor_config.json"
    for key, value, message in [
        ("size", {"height": 224, "width": 224}, "size="),
        ("do_pad", True, "do_pad=True"),
        ("default_to_square", True, "default_to_square=True"),
        ("crop_pct", 0.9, "crop_pct=0.9"),
        ("shortest_edge", 224, "unknown key 'shortest_edge'"),
    ]:
        path.write_text(json.dumps(dict(OPENAI_PREPROCESSOR_CONFIG, **{key: value})))
        with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
            ImagePreprocessor.from_pretrained(tmp_path)


def test_preprocessor_from_checkpoint_folder_and_errors(ckpt, tmp_path):
    pre = ImagePreprocessor.from_pretrained(ckpt)
    assert (pre.size, pre.crop_size) == (IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImagePreprocessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json is missing"):
        ImagePreprocessor.from_pretrained(tmp_path)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _preprocess_file(pre, path):
    """An image file as the pipeline reads it: loaded (EXIF applied, RGB), then preprocessed -> [3, H, W]."""
    return pre(load_image(path))[0]


def test_preprocess_file_any_mode(tmp_path):
    pre = ImagePreprocessor(size=16, crop_size=16)
    palette = Image.new("P", (20, 30), 0)
    palette.putpalette([10, 200, 60] + [0] * 765)
    cases = {  # file -> the RGB colour every pixel must have after loading
        "grey.png": (Image.new("L", (20, 30), 77), (77, 77, 77)),
        "grey_alpha.png": (Image.new("LA", (20, 30), (77, 255)), (77, 77, 77)),
        "palette.png": (palette, (10, 200, 60)),
        "transparent.png": (Image.new("RGBA", (20, 30), (0, 0, 0, 0)), (255, 255, 255)),  # onto white
        "opaque.png": (Image.new("RGBA", (20, 30), (5, 6, 7, 255)), (5, 6, 7)),
        "cmyk.tif": (Image.new("CMYK", (20, 30), (0, 0, 0, 0)), (255, 255, 255)),
        "sixteen.png": (Image.new("I;16", (20, 30), 257 * 120), (120, 120, 120)),
    }
    for name, (image, rgb) in cases.items():
        got = _preprocess_file(pre, _save(image, tmp_path / name))
        assert got.shape == (3, 16, 16) and got.dtype == torch.float32, name
        assert torch.allclose(got.double(), uniform_expected(rgb, 16), atol=1e-6, rtol=0), name

    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    with pytest.raises(ImageLoadError) as err:
        _preprocess_file(pre, tmp_path / "not_an_image.png")
    assert err.value.reason == "not an image"


def test_preprocess_file_applies_exif_rotation(tmp_path):
    # 48 wide x 24 high: left half red, right half blue; EXIF 6 = "rotate 90 degrees clockwise to view"
    array = np.zeros((24, 48, 3), dtype=np.uint8)
    array[:, :24] = (255, 0, 0)
    array[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(array), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)

    pre = ImagePreprocessor(size=24, crop_size=24)
    got = _preprocess_file(pre, path)
    with Image.open(path) as stored:  # the stored (sideways) pixels, rotated by hand
        upright = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)
        sideways = stored.convert("RGB")
    assert upright.size == (24, 48)
    assert torch.equal(got, pre([upright])[0])
    assert not torch.allclose(got, pre([sideways])[0], atol=0.5)
    # upright, red is on top: the top rows are red, the bottom rows blue
    red = (1 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    assert got[0, :4].mean() > red - 0.2 and got[0, -4:].mean() < 0


def test_preprocessor_stacks_mixed_sizes_and_single_image():
    pre = ImagePreprocessor(size=20, crop_size=20)
    images = [Image.new("RGB", size, (1, 2, 3)) for size in [(20, 20), (100, 30), (30, 100)]]
    assert pre(images).shape == (3, 3, 20, 20)
    assert pre(images[1]).shape == (1, 3, 20, 20)
    with pytest.raises(ValueError, match="differ in shape"):
        ImagePreprocessor(do_resize=False, do_center_crop=False)(images)
    raw = io.BytesIO()
    Image.new("RGB", (4, 4)).save(raw, format="PNG")  # a PIL image not in RGB mode is converted
    assert pre([Image.open(raw).convert("L")]).shape == (1, 3, 20, 20)


def test_num_image_tokens_comes_from_the_tower_config(tmp_path):
    from visual import CheckpointError, num_image_tokens, vision_config

    full = tmp_path / "clip"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"patch_size": 99},
                                                  "vision_config": {"image_size": 224, "patch_size": 14}}))
    assert num_image_tokens(vision_config(full)) == 256  # ViT-L/14 at 224 px: the vision half, not the text's
    vision_only = tmp_path / "vision"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": 336,
                                                         "patch_size": 14}))
    assert num_image_tokens(vision_config(vision_only)) == 576
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": 230,
                                                         "patch_size": 14}))
    with pytest.raises(ValueError, match="not a multiple"):
        num_image_tokens(vision_config(vision_only))
    with pytest.raises(CheckpointError, match="does not exist"):
        vision_config(tmp_path / "nowhere")
