"""Decode every referenced image once, in worker processes, to drop samples whose images training could not read.

The check is `visual.image_io.load_image`, the reader training and inference use, so all stages agree on
what a good image is. JPEGs are decoded at a reduced scale (libjpeg DCT scaling; the whole file is still
read and entropy-decoded, so truncation is still caught) to keep a 10k px photo from costing gigabytes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable

from tqdm import tqdm

from visual.image_io import ImageLoadError, load_image

CHECK_DRAFT_SIZE = (1, 1)  # smallest scale libjpeg offers (1/8 of each side)

# (reason, detail) with reason from ImageLoadError ("missing", "not a file", "not an image", "corrupt",
# "too large", or "unexpected error" for anything the reader did not classify); None for a good image.
ImageProblem = tuple[str, str] | None


def check_image(path: str) -> tuple[str, ImageProblem]:
    try:
        load_image(path, draft_size=CHECK_DRAFT_SIZE)
    except ImageLoadError as e:
        return path, (e.reason, e.detail)
    except Exception as e:  # a reader bug on one odd file must not stop a 100k-image run; it is reported
        return path, ("unexpected error", f"{type(e).__name__}: {e}")
    return path, None


def check_images(paths: Iterable[str], num_workers: int, progress: bool = True) -> dict[str, ImageProblem]:
    """Check each distinct path once; `num_workers` processes (0: in this process). Result keyed by path."""
    unique = list(dict.fromkeys(paths))
    results: dict[str, ImageProblem] = {}
    bar = tqdm(total=len(unique), desc="decoding images", unit="img", disable=not progress, smoothing=0.05)
    with bar:
        if num_workers == 0 or len(unique) <= 1:
            for path in unique:
                results[path] = check_image(path)[1]
                bar.update()
        else:
            chunksize = max(1, min(64, len(unique) // (num_workers * 16)))
            with multiprocessing.get_context().Pool(num_workers) as pool:
                for path, problem in pool.imap_unordered(check_image, unique, chunksize=chunksize):
                    results[path] = problem
                    bar.update()
    return results
