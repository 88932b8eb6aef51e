"""The feature cache: the frozen vision tower's patch features of every image, computed once, read every epoch.

    python process_image.py --config config.yaml --cache-features      (into the folder `data.feature_cache`)

The tower is frozen, so its output for an image never changes during training; with the cache, `train.py`
(whenever `data.feature_cache` is set) reads `patch_features` instead of decoding, preprocessing and encoding
each image every epoch, and the model never runs the tower. The cost is disk: N x C values per image
(ViT-L/14 at 224 px: 256 x 1024, 512 KB in bf16), about 40 GB for the 77k COCO images of LLaVA.

Layout of the cache folder:

    manifest.json                   what the features are, written last: a folder with it is complete
    index.json                      {"format": ..., "images": {image path: [shard file, tensor name]}}
    features-00000.safetensors ...  one tensor [N, C] per image, in image path order, files of at most 1 GiB

manifest.json: `format`; the identity, which must equal the model's (`cache_identity`): `vision_path`
(resolved), `weights` (the SHA-256 of each of the tower's weight files), `vision_feature_layer` (as a
hidden_states index >= 0; `vision_feature_layer_config` keeps the configured value), `image_size`,
`num_patches` (N), `hidden_size` (C), `preprocessor` (every ImagePreprocessor setting); then `dtype`,
`feature_shape`, `num_images`, `shards` (file, images, bytes: checked when the cache is opened) and `skipped`
(path and reason of each image that did not decode).

The whole folder is built under a temporary name beside it and renamed into place, so it is either the old
complete cache or the new complete one (a rebuild needs the disk space of both for a while). A rerun reuses
a cache whose identity matches and that holds every
image; with images missing it writes a new cache, copying the features it already has and computing the
others; a cache of another tower, layer or preprocessing is refused (rebuild it with --rebuild-features).
Images are keyed by their path as written in the processed files: after replacing image files in place,
rebuild.

The weights are identified by their content, not by their folder, size or time stamp: weights rewritten in
place (the demo's CLIP pretraining does that; so does copying another checkpoint over the folder, which may
keep the size and even the time stamp) make the cache stale, and it is refused. A size and time stamp check
alone would miss exactly those cases, so the content is hashed: streamed SHA-256, done once per process for
a given file (keyed by path, size, mtime, ctime and inode), so checking a cache and then completing it hashes
the files once. ViT-L/14's 1.7 GB took 7.5 s on a shared 2-core AMD EPYC (one core, while other jobs ran);
that is paid once by train.py and process_image.py, next to minutes of model loading and data checks.
Features are computed on the GPU in bf16 when there is one, else on the CPU in fp32. The same inputs,
machine and batch size give byte-identical files, whatever the number of decoding workers (the batch size
matters in the last bits: matrix kernels round differently for another number of images per call).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.fileio import staged_folder, write_json
from common.safetensors_file import save_safetensors
from dataprocess.schema import read_samples
from visual.frozen_tower import resolve_feature_layer
from visual.images import ImageLoadError, load_image
from visual.towers import (
    inspect_vision_checkpoint,
    load_image_preprocessor,
    load_vision_tower,
    num_image_tokens,
    vision_config,
)

CACHE_FORMAT = "clip-feature-cache/1"  # named when CLIP was the only tower; every tower's cache uses it
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
SHARD_PATTERN = "features-{:05d}.safetensors"
MAX_SHARD_BYTES = 1 << 30
# Upper bounds of a shard's safetensors header: 8-byte length + metadata, and one entry per tensor
# ('"00000123":{"dtype":"BF16","shape":[256,1024],"data_offsets":[1073217536,1073741824]},' is 87 bytes).
HEADER_BYTES = 128
HEADER_BYTES_PER_TENSOR = 128
# Fields of the manifest that must equal the model's for the features to be the ones its tower would compute.
IDENTITY_KEYS = (
    "vision_path", "weights", "vision_feature_layer", "image_size", "num_patches", "hidden_size", "preprocessor",
)
HASH_CHUNK_BYTES = 8 << 20


class FeatureCacheError(ValueError):
    """A feature cache that cannot be used or written as asked; the message names the folder and the reason."""


# --------------------------------------------------------------------------------------------------
# What the features are
# --------------------------------------------------------------------------------------------------


_file_digests: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime, ctime, inode) -> sha256


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in chunks; computed once per process for a file left unchanged."""
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def weights_identity(vision_path: str | os.PathLike) -> dict[str, str]:
    """{weight file name: "sha256:<hex>"} of a vision checkpoint folder (the files the tower is loaded from)."""
    _, files, _ = inspect_vision_checkpoint(Path(vision_path))
    return {file.name: "sha256:" + file_sha256(file) for file in files}


def cache_identity(vision_path: str | os.PathLike, vision_feature_layer: int) -> dict[str, Any]:
    """What determines the features: the tower's folder and the content of its weight files, the hidden_states
    index used, the image geometry and the preprocessing. The weights are hashed, not loaded."""
    folder = os.path.realpath(vision_path)
    config = vision_config(folder)
    processor = load_image_preprocessor(folder)
    settings = {f.name: getattr(processor, f.name) for f in fields(processor) if f.init}
    return {
        "vision_path": folder,
        "weights": weights_identity(folder),
        "vision_feature_layer": resolve_feature_layer(vision_feature_layer, config.num_hidden_layers),
        "image_size": config.image_size,
        "num_patches": num_image_tokens(config),
        "hidden_size": config.hidden_size,
        "preprocessor": json.loads(json.dumps(settings)),  # tuples -> lists, as read back from the manifest
    }


def _weights_difference(recorded: Any, expected: dict[str, str]) -> str:
    if not isinstance(recorded, dict):
        return "the cache does not record which weights computed it (written by an older version)"
    changed = [f"{name} {str(recorded.get(name))[:15]}... in the cache, {digest[:15]}... now"
               for name, digest in expected.items() if recorded.get(name) != digest]
    changed += [f"{name} is no longer in the tower's folder" for name in recorded if name not in expected]
    return "the tower's weights changed since the cache was computed (" + "; ".join(changed) + ")"


def identity_differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [
        _weights_difference(recorded.get(key), expected[key]) if key == "weights"
        else f"{key} {recorded.get(key)!r} in the cache, {expected[key]!r} for the model"
        for key in IDENTITY_KEYS
        if recorded.get(key) != expected[key]
    ]


def images_of_jsonl(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Every distinct image path of processed JSONL files, sorted."""
    return sorted({image for path in paths for _, _, sample in read_samples(path) for image in sample["images"]})


# --------------------------------------------------------------------------------------------------
# Reading: the dataset's feature_loader
# --------------------------------------------------------------------------------------------------


class FeatureCache:
    """A complete cache folder. `cache(paths)` -> FloatTensor [len(paths), N, C] in the stored dtype, the
    `feature_loader` of `SupervisedDataset`; an image not in the cache raises ImageLoadError.

    Shards are opened (memory-mapped) on first use in each process, so the object can go to DataLoader workers.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FeatureCacheError(
                f"no feature cache in {self.folder} (no {MANIFEST_FILE}): build it with "
                "`python process_image.py --config <config> --cache-features`"
            )
        self.manifest = _read_json(manifest_path)
        if self.manifest.get("format") != CACHE_FORMAT:
            raise FeatureCacheError(
                f"{manifest_path}: format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}"
            )
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise FeatureCacheError(
                    f"feature cache {self.folder}: shard {shard['file']} is {found}, the manifest says "
                    f"{shard['bytes']} bytes (copied incompletely?); rebuild with --rebuild-features"
                )
        self.index: dict[str, list[str]] = _read_json(self.folder / INDEX_FILE)["images"]
        self.dtype = getattr(torch, self.manifest["dtype"])
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, path: str) -> bool:
        return path in self.index

    def check_identity(self, expected: dict[str, Any]) -> None:
        """Raise FeatureCacheError naming every field in which the cache differs from `expected`."""
        differences = identity_differences(self.manifest, expected)
        if differences:
            raise FeatureCacheError(
                f"feature cache {self.folder} was computed for another vision tower setting: "
                + "; ".join(differences)
                + ". Rebuild it: `python process_image.py --config <config> --cache-features --rebuild-features`"
            )

    def missing(self, paths: Iterable[str]) -> list[str]:
        return [p for p in paths if p not in self.index]

    def get(self, path: str) -> torch.Tensor:
        """One image's features [N, C]."""
        try:
            shard, name = self.index[path]
        except KeyError:
            raise ImageLoadError(path, "not in the feature cache", str(self.folder)) from None
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return handle.get_tensor(name)

    def __call__(self, paths: list[str]) -> torch.Tensor:
        return torch.stack([self.get(p) for p in paths])  # [n_images, N, C]

    def close(self) -> None:
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # file handles stay in the process that opened them


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{path}: cannot be read ({e})") from e


def open_existing(folder: str | os.PathLike) -> FeatureCache | None:
    """The cache in `folder`, None for a missing or empty folder; a folder with other content is refused,
    since replacing it would delete files that are not ours."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise FeatureCacheError(f"data.feature_cache {folder} is a file, not a folder")
    if (folder / MANIFEST_FILE).is_file():
        return FeatureCache(folder)
    if any(folder.iterdir()):
        raise FeatureCacheError(
            f"data.feature_cache {folder} is a folder with other files in it and no {MANIFEST_FILE}; "
            "name an empty or new folder"
        )
    return None


def check_reusable(folder: str | os.PathLike, expected: dict[str, Any], rebuild: bool) -> None:
    """Before any work: the folder can take a cache for `expected` (not someone else's files, not a cache of
    another tower unless `rebuild`). Raises FeatureCacheError."""
    cache = open_existing(folder)
    if cache is not None and not rebuild:
        cache.check_identity(expected)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """path -> (path, pixels [3, H, W] or None, (reason, detail) or None), for a DataLoader of decoding workers."""

    def __init__(self, paths: list[str], processor):
        self.paths = paths
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return path, self.processor([load_image(path)])[0], None
        except ImageLoadError as e:
            return path, None, (e.reason, e.detail)
        except Exception as e:  # a reader bug on one odd file must not stop the run; it is reported
            return path, None, ("unexpected error", f"{type(e).__name__}: {e}")


def _as_list(batch):
    return batch


class _ShardWriter:
    """Features in order -> shard files of at most `max_bytes`, header included (one tensor may exceed it
    alone) + the index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.index: dict[str, list[str]] = {}
        self.shards: list[dict[str, Any]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = HEADER_BYTES

    def add(self, path: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size() + HEADER_BYTES_PER_TENSOR
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self.flush()
        name = f"{len(self.index):08d}"
        self._pending[name] = features.contiguous().clone()  # own storage: safetensors refuses shared tensors
        self._pending_bytes += size
        self.index[path] = [SHARD_PATTERN.format(len(self.shards)), name]

    def flush(self) -> None:
        if not self._pending:
            return
        file = SHARD_PATTERN.format(len(self.shards))
        save_safetensors(self._pending, self.folder / file)  # whole and on disk before the manifest vouches for it
        self.shards.append({"file": file, "images": len(self._pending), "bytes": (self.folder / file).stat().st_size})
        self._pending, self._pending_bytes = {}, HEADER_BYTES


@dataclass
class CacheResult:
    folder: str
    reused: bool  # True: the existing cache already had everything, nothing was written
    num_images: int  # images in the cache
    computed: int = 0  # images encoded by the tower in this run
    copied: int = 0  # images whose features came from the previous cache
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} of images that did not decode
    device: str = ""
    dtype: str = ""
    seconds: float = 0.0


def default_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build_feature_cache(
    image_paths: Iterable[str],
    folder: str | os.PathLike,
    *,
    vision_path: str | os.PathLike,
    vision_feature_layer: int = -2,
    num_workers: int = 0,
    batch_size: int | None = None,
    rebuild: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    store_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CacheResult:
    """Make `folder` a complete cache of the features of every distinct path in `image_paths`.

    `device` / `dtype`: where and in which precision the tower runs (default: GPU bf16 if there is one, else CPU
    fp32); `store_dtype`: the dtype written (default: `dtype`; that of the previous cache when completing one).
    See the module docstring for reuse and rebuild. An image that does not decode is left out, reported in
    the result and in the manifest's `skipped`. Raises FeatureCacheError before any work if the folder holds
    a cache of another tower setting (unless `rebuild`) or files that are not a cache.
    """
    start = time.perf_counter()
    folder = Path(folder).absolute()
    paths = sorted(set(image_paths))
    expected = cache_identity(vision_path, vision_feature_layer)
    existing = open_existing(folder)
    if existing is not None and not rebuild:
        existing.check_identity(expected)
        if not existing.missing(paths):
            return CacheResult(str(folder), reused=True, num_images=len(existing), dtype=existing.manifest["dtype"],
                               seconds=time.perf_counter() - start)
    previous = existing if existing is not None and not rebuild else None

    if device is None:
        device, default_dtype = default_device()
        dtype = dtype or default_dtype
    device, dtype = torch.device(device), dtype or torch.float32
    store_dtype = previous.dtype if previous is not None else store_dtype or dtype  # one dtype per cache
    to_compute = [p for p in paths if previous is None or p not in previous]
    stream = _encode_images(to_compute, expected, vision_feature_layer, device, dtype, store_dtype,
                            batch_size or (128 if device.type == "cuda" else 16), num_workers)
    result = CacheResult(str(folder), reused=False, num_images=0, device=str(device), dtype=_dtype_name(store_dtype))
    with staged_folder(folder) as staging:  # the old cache stays in place until the new one is complete
        writer = _ShardWriter(staging, max_shard_bytes)
        _fill(writer, paths, previous, stream, store_dtype, result, progress)
        _finish(writer, staging, expected, vision_feature_layer, result)
        if previous is not None:
            previous.close()
    result.seconds = time.perf_counter() - start
    return result


def _encode_images(paths: list[str], expected: dict[str, Any], vision_feature_layer: int, device: torch.device,
                   dtype: torch.dtype, store_dtype: torch.dtype, batch_size: int, num_workers: int,
                   ) -> Iterator[tuple[str, torch.Tensor | None, tuple[str, str] | None]]:
    """(path, features [N, C] in store_dtype on the CPU or None, problem or None) for each path, in order:
    images decoded by DataLoader workers, encoded by the tower in batches."""
    tower = load_vision_tower(expected["vision_path"], feature_layer=vision_feature_layer, dtype=dtype)
    tower.to(device)
    assert (tower.num_patches, tower.hidden_size) == (expected["num_patches"], expected["hidden_size"]), (
        f"tower gives [{tower.num_patches}, {tower.hidden_size}] features, its config says "
        f"[{expected['num_patches']}, {expected['hidden_size']}]"
    )
    loader = DataLoader(
        _ImageFiles(paths, load_image_preprocessor(expected["vision_path"])),
        batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    for batch in loader:
        good = [x for _, x, _ in batch if x is not None]
        feats = iter(())
        if good:
            pixels = torch.stack(good).to(device, non_blocking=True)  # [B, 3, S, S]
            feats = iter(tower(pixels).to("cpu", store_dtype))  # [B, N, C]
        for path, x, problem in batch:
            yield path, (next(feats) if x is not None else None), problem


def _fill(writer: _ShardWriter, paths: list[str], previous: FeatureCache | None, stream, store_dtype: torch.dtype,
          result: CacheResult, progress: bool) -> None:
    """Every path's features into the shards, in path order: copied from the previous cache or computed."""
    bar = tqdm(total=len(paths), desc="image features", unit="img", disable=not progress, smoothing=0.05)
    with bar:
        for path in paths:
            if previous is not None and path in previous:
                writer.add(path, previous.get(path).to(store_dtype))
                result.copied += 1
            else:
                got, features, problem = next(stream)
                assert got == path, f"feature stream out of order: {got} for {path}"
                if features is None:
                    reason, detail = problem
                    result.skipped.append({"path": path, "reason": reason + (f" ({detail})" if detail else "")})
                else:
                    writer.add(path, features)
                    result.computed += 1
            bar.update()
    writer.flush()
    result.num_images = len(writer.index)


def _finish(writer: _ShardWriter, staging: Path, expected: dict[str, Any], vision_feature_layer: int,
            result: CacheResult) -> None:
    """The index, then the manifest, which marks the folder complete."""
    write_json(staging / INDEX_FILE, {"format": CACHE_FORMAT, "images": writer.index}, indent=1)
    for shard in writer.shards:
        os.chmod(staging / shard["file"], 0o644)  # safetensors writes private files; the cache is ordinary data
    manifest = {
        "format": CACHE_FORMAT,
        **expected,
        "vision_feature_layer_config": vision_feature_layer,
        "dtype": result.dtype,
        "feature_shape": [expected["num_patches"], expected["hidden_size"]],
        "num_images": result.num_images,
        "shards": writer.shards,
        "skipped": result.skipped,
    }
    write_json(staging / MANIFEST_FILE, manifest, indent=1)  # last: its presence marks a complete cache


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_result(result: CacheResult) -> str:
    if result.reused:
        return f"feature cache {result.folder}: up to date ({result.num_images} images, {result.dtype}), reused"
    lines = [
        f"feature cache {result.folder}: {result.num_images} images ({result.computed} computed on {result.device}, "
        f"{result.copied} copied from the previous cache), {result.dtype}, {result.seconds:.1f}s"
    ]
    if result.skipped:
        lines.append(f"  {len(result.skipped)} images skipped (did not decode):")
        lines.extend(f"    {s['path']}: {s['reason']}" for s in result.skipped[:10])
        if len(result.skipped) > 10:
            lines.append(f"    ... and {len(result.skipped) - 10} more (all listed in the manifest)")
    return "\n".join(lines)
