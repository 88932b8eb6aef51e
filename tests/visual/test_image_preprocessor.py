"""visual.images.ImagePreprocessor for SigLIP: pixels equal to transformers' SiglipImageProcessorPil on images of
every mode and size, the published preprocessor_config.json read (unknown keys and size forms refused), and
the transformers settings it writes give the same pixels again (for CLIP too)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from visual.images import ImagePreprocessor

from .test_visual import OPENAI_PREPROCESSOR_CONFIG

# google/siglip-so400m-patch14-384's preprocessor_config.json, verbatim.
SO400M_PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}

METADATA = ("image_processor_type", "processor_class", "feature_extractor_type")


def transformers_processor(cls, config):
    return cls(**{k: v for k, v in config.items() if k not in METADATA})


def sample_images(seed=0):
    """Noise (the hardest case for rounding) in several modes and sizes, smaller and larger than 384."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in [(384, 384), (640, 480), (480, 640), (385, 383), (1000, 123), (50, 37), (13, 400)]:
        rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        images += [
            Image.fromarray(rgba[..., :3]),  # RGB
            Image.fromarray(rgba, "RGBA"),  # composited onto white by both
            Image.fromarray(rgba[..., 0], "L"),  # greyscale
            Image.fromarray(rgba[..., :2], "LA"),
            Image.fromarray(rgba[..., 0], "L").convert("P"),
        ]
    # (16-bit greyscale is left out on purpose: we rescale it to 8 bits, transformers clips it; see images.py)
    return images


def test_siglip_preprocessing_equals_transformers_pil_processor():
    ours = ImagePreprocessor.from_dict(SO400M_PREPROCESSOR_CONFIG)
    assert ours.size == (384, 384) and not ours.do_center_crop and ours.image_mean == ours.image_std == (0.5,) * 3
    reference = transformers_processor(SiglipImageProcessorPil, SO400M_PREPROCESSOR_CONFIG)
    images = sample_images()
    for i in range(0, len(images), 5):  # a handful at a time: one size, every mode
        batch = images[i : i + 5]
        got = ours(batch)
        expected = torch.as_tensor(reference(images=batch, return_tensors="pt")["pixel_values"])
        assert got.shape == expected.shape == (5, 3, 384, 384) and got.dtype == torch.float32
        assert torch.equal(got, expected), (batch[0].size, (got - expected).abs().max().item())


def test_siglip_resize_keeps_no_aspect_ratio_by_hand():
    # 6 x 2 image, left half black, right half white; resized to 4 x 4 (nearest): the halves stay left and right
    array = np.zeros((2, 6, 3), dtype=np.uint8)
    array[:, 3:] = 255
    pre = ImagePreprocessor(size=(4, 4), do_center_crop=False, resample=Image.Resampling.NEAREST.value,
                            do_normalize=False)
    got = pre(Image.fromarray(array))[0, 0]
    assert got.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 4
    assert pre.resized_size(97, 61) == (4, 4) and pre.output_size == (4, 4)
    assert ImagePreprocessor(size=(30, 20), do_center_crop=False).resized_size(97, 61) == (20, 30)  # (width, height)
    assert ImagePreprocessor(size=20, do_center_crop=False).output_size is None


def test_siglip_config_defaults_are_siglips():
    """Keys a SigLIP file leaves out take SiglipImageProcessor's defaults (no crop, mean/std 0.5), not CLIP's."""
    minimal = ImagePreprocessor.from_dict({"image_processor_type": "SiglipImageProcessor",
                                           "size": {"height": 384, "width": 384}})
    assert minimal == ImagePreprocessor.from_dict(SO400M_PREPROCESSOR_CONFIG)
    assert ImagePreprocessor.from_dict({"image_processor_type": "SiglipImageProcessorFast"}).size == (224, 224)


def test_siglip_config_errors(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    for change, message in [
        ({"size": 384}, "size=384 is not supported for SigLIP"),
        ({"size": {"shortest_edge": 384}}, "is not supported for SigLIP"),
        ({"do_pad": True}, "do_pad=True"),
        ({"crop_pct": 0.9}, "crop_pct=0.9"),
        ({"max_num_patches": 256}, "unknown key 'max_num_patches'"),
        ({"image_processor_type": "Siglip2ImageProcessor"}, r"image processor type 'Siglip2ImageProcessor' is not "
                                                            r"supported \(only CLIPImageProcessor"),
    ]:
        path.write_text(json.dumps(dict(SO400M_PREPROCESSOR_CONFIG, **change)))
        with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
            ImagePreprocessor.from_pretrained(tmp_path)
    path.write_text(json.dumps(SO400M_PREPROCESSOR_CONFIG))
    assert ImagePreprocessor.from_pretrained(tmp_path) == ImagePreprocessor.from_dict(SO400M_PREPROCESSOR_CONFIG)


@pytest.mark.parametrize("config,cls", [
    (SO400M_PREPROCESSOR_CONFIG, SiglipImageProcessorPil),
    (OPENAI_PREPROCESSOR_CONFIG, CLIPImageProcessorPil),
])
def test_transformers_config_round_trip(config, cls):
    """What an export writes: transformers' processor of the named type, built from it, gives our pixels."""
    ours = ImagePreprocessor.from_dict(config)
    written = ours.to_transformers_config()
    assert written["image_processor_type"] == cls.__name__.removesuffix("Pil")
    assert ImagePreprocessor.from_dict(written) == ours
    images = sample_images(seed=1)[:10]
    expected = torch.as_tensor(transformers_processor(cls, written)(images=images, return_tensors="pt")["pixel_values"])
    assert torch.equal(ours(images), expected)
