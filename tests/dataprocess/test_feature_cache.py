"""The CLIP feature cache: same loss and gradients as the pixel path, the Trainer never runs the tower, a cache of
another layer is refused with one message, files are deterministic and reused, bad images are skipped and counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import process_image
import train
from dataprocess import features
from dataprocess.features import (
    MANIFEST_FILE,
    FeatureCache,
    FeatureCacheError,
    build_feature_cache,
    images_of_jsonl,
)
from tests.projects import write_test_project
from visual.clip_tower import CLIPVisionTower
from visual.images import ImageLoadError


@pytest.fixture(scope="module", autouse=True)
def cpu_fp32():
    """Features computed on the CPU in fp32 on every machine, so that the comparisons below mean the same on a GPU
    machine (where the cache would otherwise be computed in bf16); one torch thread, as in tests/test_training.py:
    on a busy machine, small ops on two threads wait ~100x longer for each other than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "default_device", lambda: (torch.device("cpu"), torch.float32))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(cpu_fp32, tmp_path_factory, tiny_llm_dir, tiny_clip_dir):
    """A small synthetic set processed by `process_image.py --cache-features` into data/features."""
    root = tmp_path_factory.mktemp("cached")
    return write_test_project(
        root, tiny_llm_dir, tiny_clip_dir, n_train=10, n_aic=4, n_heldout=0, seed=2, val_size=1, cache_features=True,
        training={"output_dir": str(root / "out"), "seed": 3, "max_steps": 1, "per_device_train_batch_size": 2,
                  "learning_rate": 1e-3, "report_to": "none", "disable_tqdm": True, "save_strategy": "no"},
    )


def build_model(llm_dir, clip_dir, seed=0):
    from model import apply_lora, build_vlm

    model = apply_lora(build_vlm(llm_dir, clip_dir), r=4, alpha=8, dropout=0.0, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every LoRA A gradient zero: make both live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_features_give_the_same_loss_and_gradients_as_pixels(project, tiny_llm_dir, tiny_clip_dir, monkeypatch):
    from dataset import DataCollator, SupervisedDataset
    from qwen import QWenTokenizer
    from visual import load_image_preprocessor

    model = build_model(tiny_llm_dir, tiny_clip_dir)
    tokenizer = QWenTokenizer.from_pretrained(tiny_llm_dir)
    common = dict(num_image_tokens=model.vision_tower.num_patches, system="You are a helpful assistant.",
                  max_length=256, seed=0)
    train_file = project / "data" / "train.jsonl"
    pixels = SupervisedDataset(train_file, tokenizer, load_image_preprocessor(tiny_clip_dir), **common)
    cache = FeatureCache(project / "data" / "features")
    cached = SupervisedDataset(train_file, tokenizer, None, feature_loader=cache, **common)
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)
    indices = [0, len(pixels) - 1]  # a LLaVA and a caption sample, one image each
    pixel_batch = collate([pixels[i] for i in indices])
    cached_batch = collate([cached[i] for i in indices])
    assert pixel_batch["pixel_values"].shape[0] == 2 and cached_batch["patch_features"].shape == (2, 16, 32)
    assert "pixel_values" not in cached_batch and torch.equal(pixel_batch["input_ids"], cached_batch["input_ids"])

    pixel_loss, pixel_grads = loss_and_grads(model, pixel_batch)
    assert {n for n in pixel_grads if "projector" in n} and {n for n in pixel_grads if "lora_A" in n}
    assert all(g.abs().sum() > 0 for g in pixel_grads.values())  # every gradient compared is a live one
    # The cache holds each image's features in its row. fp32 CPU matmuls round differently for another number
    # of images per call (the cache was computed 16 at a time, the model encodes these 2): ~1e-7 relative.
    tower_features = model.vision_tower(pixel_batch["pixel_values"])
    torch.testing.assert_close(cached_batch["patch_features"], tower_features, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached_batch["patch_features"], tower_features.roll(1, dims=0), atol=1e-3)

    def no_tower(*args, **kwargs):
        raise AssertionError("the vision tower ran although features were given")

    monkeypatch.setattr(CLIPVisionTower, "forward", no_tower)
    # Given the tower's features of this batch, the feature path is bit-identical to the pixel path...
    same_loss, same_grads = loss_and_grads(model, {**cached_batch, "patch_features": tower_features})
    assert torch.equal(same_loss, pixel_loss)
    for name, grad in pixel_grads.items():
        assert torch.equal(same_grads[name], grad), name
    # ... and with the cached features themselves it is equal up to that rounding.
    cached_loss, cached_grads = loss_and_grads(model, cached_batch)
    torch.testing.assert_close(cached_loss, pixel_loss, rtol=1e-6, atol=0)
    for name, grad in pixel_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_trainer_trains_from_the_cache_without_running_the_tower(project, monkeypatch, capsys):
    def no_tower(*args, **kwargs):
        raise AssertionError("the vision tower ran during training from the feature cache")

    monkeypatch.setattr(CLIPVisionTower, "forward", no_tower)
    out = project / "out-cached"
    assert train.main(["--config", str(project / "config.yaml"), "--output_dir", str(out), "--eval_file", ""]) == 0
    assert "image features from the cache" in capsys.readouterr().out
    assert (out / "projector.safetensors").is_file()


def test_a_cache_of_another_layer_or_incomplete_is_one_clear_error(project, tmp_path, capsys):
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"]["vision_feature_layer"] = -1
    config["training"]["output_dir"] = str(tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "was computed for another vision tower setting: vision_feature_layer 1 in the cache, 2 for the model" in err
    assert "--rebuild-features" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    # process_image.py refuses to overwrite it, before processing anything
    config["data"]["output"] = str(tmp_path / "data" / "train.jsonl")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert process_image.main(["--config", str(tmp_path / "c.yaml"), "--cache-features"]) == 2
    assert "vision_feature_layer 1 in the cache, 2 for the model" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()

    # a cache that lacks images of the training file
    config["model"]["vision_feature_layer"] = -2
    config["data"]["feature_cache"] = str(tmp_path / "partial")
    config["data"]["output"] = str(project / "data" / "train.jsonl")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    images = images_of_jsonl([project / "data" / "train.jsonl", project / "data" / "train.val.jsonl"])
    build_feature_cache(images[:3], tmp_path / "partial", vision_path=config["model"]["vision_path"], progress=False)
    assert train.main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert f"lacks {len(images) - 3} images" in capsys.readouterr().err


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cache_files_are_deterministic_reused_and_completed(project, tiny_clip_dir, tmp_path):
    images = images_of_jsonl([project / "data" / "train.jsonl", project / "data" / "train.val.jsonl"])
    # 5 images a shard; one image per tower call, so that an image's features do not depend on its batch mates
    shard_bytes = features.HEADER_BYTES + 5 * (16 * 32 * 4 + features.HEADER_BYTES_PER_TENSOR)
    kwargs = dict(vision_path=tiny_clip_dir, max_shard_bytes=shard_bytes, batch_size=1, progress=False)
    a = build_feature_cache(images, tmp_path / "a", num_workers=0, **kwargs)
    b = build_feature_cache(list(reversed(images)), tmp_path / "b", num_workers=2, **kwargs)
    assert a.computed == b.computed == len(images) == 14 and not a.skipped
    shards = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["shards"]
    assert [s["images"] for s in shards] == [5, 5, 4] and all(s["bytes"] <= shard_bytes for s in shards)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    torch.testing.assert_close(FeatureCache(tmp_path / "a")(images),
                               FeatureCache(project / "data" / "features")(images))

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = build_feature_cache(images[:5], tmp_path / "a", **kwargs)
    assert again.reused and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before

    partial = build_feature_cache(images[::2], tmp_path / "c", **kwargs)
    completed = build_feature_cache(images, tmp_path / "c", **kwargs)
    assert (partial.computed, completed.copied, completed.computed) == (7, 7, 7)
    assert file_bytes(tmp_path / "c") == file_bytes(tmp_path / "a")

    with pytest.raises(FeatureCacheError, match="vision_feature_layer 1 in the cache, 2 for the model"):
        build_feature_cache(images, tmp_path / "c", vision_feature_layer=-1, **kwargs)
    rebuilt = build_feature_cache(images, tmp_path / "c", vision_feature_layer=-1, rebuild=True, **kwargs)
    assert rebuilt.computed == 14 and not torch.equal(FeatureCache(tmp_path / "c")(images[:1]),
                                                       FeatureCache(tmp_path / "a")(images[:1]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FeatureCacheError, match="other files in it"):
        build_feature_cache(images, tmp_path / "d", **kwargs)


def test_an_image_that_does_not_decode_is_skipped_and_counted(project, tiny_clip_dir, tmp_path):
    good = images_of_jsonl([project / "data" / "train.jsonl"])[:2]
    jpeg = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(jpeg, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    bad = [str(tmp_path / "truncated.jpg"), str(tmp_path / "text.jpg"), str(tmp_path / "gone.png")]
    result = build_feature_cache(good + bad, tmp_path / "cache", vision_path=tiny_clip_dir, progress=False)
    assert (result.computed, result.num_images, len(result.skipped)) == (2, 2, 3)
    reasons = {s["path"]: s["reason"].split(" (")[0] for s in result.skipped}
    assert reasons == {bad[0]: "corrupt", bad[1]: "not an image", bad[2]: "missing"}
    manifest = json.loads((tmp_path / "cache" / MANIFEST_FILE).read_text())
    assert manifest["num_images"] == 2 and manifest["skipped"] == result.skipped
    cache = FeatureCache(tmp_path / "cache")
    assert cache(good).shape == (2, 16, 32)
    with pytest.raises(ImageLoadError, match="not in the feature cache"):
        cache([bad[0]])


def test_weights_rewritten_in_place_make_the_cache_stale(project, tiny_clip_dir, tmp_path, capsys):
    """The demo's CLIP pretraining rewrites model.safetensors in its folder: same folder, config and
    preprocessing, other features. The cache records the weights' SHA-256 and refuses the changed tower."""
    import shutil

    from safetensors.torch import load_file

    from common.fileio import staged_file
    from common.safetensors_file import save_safetensors

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    images = images_of_jsonl([project / "data" / "train.jsonl", project / "data" / "train.val.jsonl"])
    kwargs = dict(vision_path=clip, progress=False)
    build_feature_cache(images, tmp_path / "features", **kwargs)
    manifest = json.loads((tmp_path / "features" / MANIFEST_FILE).read_text())
    digest = features.hashlib.sha256((clip / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["weights"] == {"model.safetensors": "sha256:" + digest}

    # rewriting the same bytes (a new inode and time stamp) keeps the cache: it is the content that counts
    same = (clip / "model.safetensors").read_bytes()
    with staged_file(clip / "model.safetensors") as temp:
        temp.write_bytes(same)
    assert build_feature_cache(images, tmp_path / "features", **kwargs).reused

    # new weights written in place, as demo.pretrain.pretrain_clip saves them
    weights = load_file(clip / "model.safetensors")
    weights["vision_model.encoder.layers.0.mlp.fc1.weight"] += 0.01
    save_safetensors(weights, clip / "model.safetensors")
    with pytest.raises(FeatureCacheError, match="the tower's weights changed since the cache was computed") as error:
        build_feature_cache(images, tmp_path / "features", **kwargs)
    assert "model.safetensors sha256:" + digest[:8] in str(error.value) and "--rebuild-features" in str(error.value)

    # train.py refuses it too, before building anything
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"]["vision_path"] = str(clip)
    config["data"]["feature_cache"] = str(tmp_path / "features")
    config["training"]["output_dir"] = str(tmp_path / "out")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "the tower's weights changed" in err and "--rebuild-features" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    rebuilt = build_feature_cache(images, tmp_path / "features", rebuild=True, **kwargs)
    assert rebuilt.computed == len(images)
    assert train.open_feature_cache(train.parse_train_args(["--config", str(tmp_path / "c.yaml")])) is not None
