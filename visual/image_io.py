"""Reading an image file into an RGB picture, the same way everywhere (preprocessing, training, inference).

Any mode becomes RGB: transparency is composited onto white (LLaVA's plain `convert("RGB")` turns
transparent pixels black), 16-bit and 32-bit greyscale are rescaled to 8 bits instead of clipped,
CMYK and palettes go through Pillow's own conversion. The EXIF orientation is applied, so a phone
photo stored sideways is seen upright. A file that is missing, not an image, or truncated raises
`ImageLoadError` naming the file and the reason.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def load_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert to RGB. Raises `ImageLoadError`.

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
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                # Pillow only raises above twice its limit (and warns in between), so check ours here.
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        path, "too large", f"{img.width}x{img.height} is over {MAX_IMAGE_PIXELS} pixels"
                    )
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
