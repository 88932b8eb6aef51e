"""Images, the same way everywhere: reading a file into an RGB picture, and each tower's preprocessing.

Reading (`load_image`): any mode becomes RGB: transparency is composited onto white (LLaVA's plain
`convert("RGB")` turns transparent pixels black), 16-bit and 32-bit greyscale are rescaled to 8 bits
instead of clipped, CMYK and palettes go through Pillow's own conversion. The EXIF orientation is
applied, so a phone photo stored sideways is seen upright. A file that is missing, not an image, or
truncated raises `ImageLoadError` naming the file and the reason.

Preprocessing (`ImagePreprocessor`), in PIL + numpy: one implementation for training and inference, for CLIP
and SigLIP alike. transformers picks a different backend for its image processors depending on whether
torchvision is installed, and the two differ by up to 0.028 per value; this module does the math itself, so
the pixels a model was trained on are the pixels it sees at inference, on any machine. The steps and their
rounding follow transformers' PIL backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`) exactly:

1. resize, on the 8-bit RGB image, with the configured PIL filter (bicubic for both): CLIP makes the
   shortest edge `size` (the long edge is `int(size * long / short)`); SigLIP resizes to exactly
   (height, width), the aspect ratio not kept;
2. centre crop to `crop_size` (CLIP only; top/left offsets floor((dim - crop) / 2); zero padding if smaller);
3. rescale: uint8 -> float64 * rescale_factor (1/255) -> float32;
4. normalise in float32: (x - mean) / std (OpenAI's mean/std for CLIP, 0.5 for SigLIP);
5. HWC -> CHW.

`ImagePreprocessor.from_pretrained(dir)` reads `preprocessor_config.json`: CLIP's in the old format of
openai/clip-vit-large-patch14 (`"size": 224`, `"crop_size": 224`) or the newer one (`{"shortest_edge": 224}`,
`{"height": 224, "width": 224}`, `do_rescale`, `rescale_factor`, `do_convert_rgb`), or SigLIP's
(`"image_processor_type": "SiglipImageProcessor"`, `"size": {"height": 384, "width": 384}`). A key that would
change the result in a way not implemented here, or a key we do not know, is a ValueError naming the key and
the file.

`shrink(image)` is what to keep of an image that is preprocessed later (a chat's earlier images): a small
image that preprocesses to exactly the same pixels.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

# Photographs can be large (the held-out sets include 10k px images); decode them, but not without limit:
# at 3 bytes a pixel, 250M pixels is 750 MB of RGB.
MAX_IMAGE_PIXELS = 250_000_000


class ImageLoadError(Exception):
    """An image that cannot be used. `reason` is a short stable label used in reports."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot load image {self.path}: {reason}" + (f" ({detail})" if detail else ""))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # Palettes may carry transparency; go through RGBA so it is composited like other alpha.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # 65535 -> 255
        else:
            top = float(arr.max()) if arr.size else 0.0
            if top > 255.0:
                arr = arr * (255.0 / top)
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert to RGB. Raises `ImageLoadError`.

    An image of more than `max_pixels` (default `MAX_IMAGE_PIXELS`) is refused as "too large" from its header,
    before anything is decoded.

    `draft_size` (for checks that only need to know the file decodes, like process_image.py): a JPEG
    may then be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), never below this size. Every
    byte of the file is still read and entropy-decoded, so a truncated or corrupt file fails the same
    way, while a 10k px photo needs 64 times less memory. Other formats ignore it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(path, "missing")
    if not os.path.isfile(path):
        raise ImageLoadError(path, "not a file")
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # Pillow only raises above twice its limit (and warns in between), so check ours here.
                if img.width * img.height > limit:
                    raise ImageLoadError(path, "too large", f"{img.width}x{img.height} is over {limit:,} pixels")
                if draft_size is not None and img.format == "JPEG":
                    img.draft(None, draft_size)
                img.load()  # decode every byte now: a truncated file fails here, not later
                img = ImageOps.exif_transpose(img) or img
                rgb = to_rgb(img)
                rgb.load()
                return rgb
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image", str(e)) from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, "too large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated", "broken data
        # stream"), and some decoders raise SyntaxError or ValueError on malformed headers.
        raise ImageLoadError(path, "corrupt", str(e)) from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# --------------------------------------------------------------------------------------------------
# Preprocessing (CLIP's and SigLIP's)
# --------------------------------------------------------------------------------------------------

PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN, SiglipImageProcessor's default
SIGLIP_STD = (0.5, 0.5, 0.5)

# Keys that only describe the file (which class wrote it) and do not affect the pixels.
METADATA_KEYS = {"feature_extractor_type", "image_processor_type", "processor_class", "image_seq_length"}
# Keys that are harmless at exactly these values; any other value would change the output.
NEUTRAL_VALUES = {
    "default_to_square": (False,),
    "do_pad": (False, None),
    "pad_size": (None,),
    "crop_pct": (None,),
    "data_format": ("channels_first", None),
    "input_data_format": (None,),
    "return_tensors": (None, "pt"),
    "device": (None,),
    "disable_grouping": (None, False, True),  # batching detail of the torchvision backend only
}


@dataclass(frozen=True)
class ImagePreprocessor:
    """PIL images -> normalised float32 pixel tensors [N, 3, height, width].

    `size` is the resize: an int resizes the shortest edge to it, keeping the aspect ratio (CLIP); a (height,
    width) pair resizes to exactly that, aspect ratio not kept (SigLIP). The defaults are
    openai/clip-vit-large-patch14's; `from_pretrained` gives any folder's own settings.
    """

    size: int | tuple[int, int] = 224  # shortest edge, or (height, width) exactly
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BICUBIC.value
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _std: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.crop_size, int):
            object.__setattr__(self, "crop_size", (self.crop_size, self.crop_size))
        object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        if not isinstance(self.size, int):
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "image_mean", _three_floats(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _three_floats(self.image_std, "image_std"))
        sizes = (self.size,) if isinstance(self.size, int) else self.size
        if len(sizes) not in (1, 2) or min(sizes) <= 0 or len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"size {self.size} and crop_size {self.crop_size} must be positive")
        if self.resample not in {r.value for r in Image.Resampling}:
            raise ValueError(f"resample {self.resample!r} is not a PIL resampling filter (0..5)")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std {self.image_std} contains 0")
        # float32, as the reference normalises in the dtype of the rescaled image
        object.__setattr__(self, "_mean", np.asarray(self.image_mean, dtype=np.float32))
        object.__setattr__(self, "_std", np.asarray(self.image_std, dtype=np.float32))

    # Construction from a checkpoint folder -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike) -> ImagePreprocessor:
        """Read `preprocessor_config.json` of a local checkpoint folder (CLIP's, old or new format, or SigLIP's)."""
        path = Path(checkpoint_dir) / PREPROCESSOR_CONFIG
        if not Path(checkpoint_dir).is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} does not exist")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (the vision checkpoint folder must have {PREPROCESSOR_CONFIG})"
            )
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> ImagePreprocessor:
        """Interpret a preprocessor config dict; `source` names the file in error messages.

        The processor type (`image_processor_type`, or `feature_extractor_type` in old files; CLIP's when
        neither is given) decides the defaults of the keys the file leaves out and the form `size` must take.
        """
        kind = _processor_kind(raw, source)
        own = {f.name for f in fields(cls) if f.init}
        kwargs = dict(kind.defaults)
        for key, value in raw.items():
            if key in METADATA_KEYS:
                continue
            if key in NEUTRAL_VALUES:
                if value not in NEUTRAL_VALUES[key]:
                    raise ValueError(
                        f"{source}: {key}={value!r} is not supported (only {NEUTRAL_VALUES[key]})"
                    )
                continue
            if key not in own:
                raise ValueError(
                    f"{source}: unknown key {key!r}; refusing to guess how it changes the pixels"
                )
            if key == "size":
                value = kind.parse_size(value, source)
            elif key == "crop_size":
                value = _height_width(value, source)
            elif key == "resample" and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"{source}: resample={value!r} must be a PIL filter number (3 = bicubic)")
            elif key in ("image_mean", "image_std"):
                value = _three_floats(value, f"{source}: {key}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_transformers_config(self) -> dict:
        """The preprocessor_config.json settings with which transformers' image processor of the matching type
        (CLIPImageProcessor for a shortest-edge resize, SiglipImageProcessor for an exact one) gives these
        pixels; `from_dict` reads them back to an equal preprocessor."""
        exact = self.resizes_exactly
        height, width = self.crop_size
        return {
            "image_processor_type": "SiglipImageProcessor" if exact else "CLIPImageProcessor",
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": {"height": self.size[0], "width": self.size[1]} if exact else {"shortest_edge": self.size},
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": height, "width": width},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    # Geometry ------------------------------------------------------------------------------------------

    @property
    def resizes_exactly(self) -> bool:
        """True when `size` is a (height, width) to resize to, aspect ratio not kept (SigLIP's resize)."""
        return not isinstance(self.size, int)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None when it depends on the input's shape."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.resizes_exactly:
            return self.size
        return None

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, rounded like the reference: exactly `size`, or the shortest edge
        made `size` (the long edge floored)."""
        if self.resizes_exactly:
            return self.size[1], self.size[0]
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    # The math ------------------------------------------------------------------------------------------

    def _rgb(self, image: Image.Image) -> Image.Image:
        if image.mode == "RGB":
            return image
        if not self.do_convert_rgb:
            raise ValueError(f"image mode {image.mode} is not RGB and do_convert_rgb is False")
        return to_rgb(image)

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 array [3, height, width]."""
        image = self._rgb(image)
        if self.do_resize:
            image = image.resize(self.resized_size(*image.size), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, 3] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, *self.crop_size)
        if self.do_rescale:
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = pixels.astype(np.float32)
        if self.do_normalize:
            values = (values - self._mean) / self._std
        return np.ascontiguousarray(values.transpose(2, 0, 1))  # [3, H, W]

    def shrink(self, image: Image.Image) -> Image.Image:
        """What to keep of an image that is preprocessed later: the smallest RGB image that `preprocess_image`
        turns into exactly the pixels of `image`. With resize and centre crop on, it is at most
        max(size, crop) pixels a side (CLIP: 224 x 224, 150 KB, for a 10k px photo of 300 MB); with an exact resize
        (SigLIP), the resized image itself.

        It is `image` resized (shortest edge `size`), then cut down to what the centre crop reads. Preprocessing
        it again resizes nothing (the shortest edge already is `size`: PIL copies an image resized to its own
        size) and crops the same pixels: an edge is cut to max(crop, size), so the shortest stays `size`, at an
        offset that puts the crop's window where it was (floor((kept - crop) / 2) from the cut's start)."""
        image = self._rgb(image)
        if self.do_resize:
            image = image.resize(self.resized_size(*image.size), resample=self.resample)
        if not self.do_center_crop:
            return image
        floor = self.size if self.do_resize else 0
        (width, left), (height, top) = (_centre_cut(image.width, self.crop_size[1], floor),
                                        _centre_cut(image.height, self.crop_size[0], floor))
        if (width, height) == image.size:
            return image
        return image.crop((left, top, left + width, top + height))

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> float32 tensor [N, 3, H, W] (one image gives N = 1)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        arrays = [self.preprocess_image(image) for image in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(
                f"preprocessed images differ in shape {sorted(shapes)}; enable a centre crop or an exact resize"
            )
        return torch.from_numpy(np.stack(arrays))


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """[H, W, C] -> [crop_height, crop_width, C]; an image smaller than the crop is zero padded around it."""
    height, width = pixels.shape[:2]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top < 0 or left < 0:
        padded_height, padded_width = max(height, crop_height), max(width, crop_width)
        pad_top = math.ceil((padded_height - height) / 2)
        pad_left = math.ceil((padded_width - width) / 2)
        padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
        padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
        pixels, top, left = padded, top + pad_top, left + pad_left
    return pixels[top : top + crop_height, left : left + crop_width]


def _centre_cut(length: int, crop: int, floor: int) -> tuple[int, int]:
    """(kept length, start) of one edge for `shrink`: at most max(crop, floor) pixels, placed so that a centre
    crop of the kept part starts where the centre crop of the whole edge starts."""
    kept = min(length, max(crop, floor))  # an edge shorter than the crop (padded by preprocessing) is kept whole
    return kept, (length - crop) // 2 - (kept - crop) // 2


def _shortest_edge(value, source: str) -> int:
    """`224` (old format) or `{"shortest_edge": 224}` (new format) -> 224."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        extra = {k: v for k, v in value.items() if k != "shortest_edge" and v is not None}
        if "shortest_edge" in value and not extra:
            return int(value["shortest_edge"])
    raise ValueError(f"{source}: size={value!r} is not supported (only an int or {{'shortest_edge': int}})")


def _exact_size(value, source: str) -> tuple[int, int]:
    """`{"height": 384, "width": 384}` -> (384, 384): SigLIP's resize, to exactly that size."""
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise ValueError(
        f"{source}: size={value!r} is not supported for SigLIP (only {{'height': int, 'width': int}})"
    )


def _height_width(value, source: str) -> tuple[int, int]:
    """`224` (old format) or `{"height": 224, "width": 224}` (new format) -> (224, 224)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"{source}: crop_size={value!r} is not supported (only an int or {{'height', 'width'}})")


def _three_floats(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {value}")
    return value


@dataclass(frozen=True)
class _ProcessorKind:
    """What a preprocessor_config.json of one transformers processor type means."""

    parse_size: Callable[[object, str], int | tuple[int, int]]
    defaults: dict  # that class's defaults, for the keys a file leaves out (over ImagePreprocessor's own)


# transformers' processor class names ("Fast" and "Pil" backends stripped) -> how to read their files.
PROCESSOR_KINDS = {
    "CLIPImageProcessor": _ProcessorKind(_shortest_edge, {}),
    "CLIPFeatureExtractor": _ProcessorKind(_shortest_edge, {}),
    "SiglipImageProcessor": _ProcessorKind(_exact_size, {
        "size": (224, 224), "do_center_crop": False, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD,
    }),
}


def _processor_kind(raw: dict, source: str) -> _ProcessorKind:
    """The kind named by `image_processor_type` (or the older `feature_extractor_type`); CLIP's when neither is
    given, as in the files this project has always read."""
    name = raw.get("image_processor_type") or raw.get("feature_extractor_type") or "CLIPImageProcessor"
    kind = PROCESSOR_KINDS.get(str(name).removesuffix("Fast").removesuffix("Pil"))
    if kind is None:
        raise ValueError(
            f"{source}: image processor type {name!r} is not supported (only {', '.join(PROCESSOR_KINDS)})"
        )
    return kind
