"""Raw sources → checked unified samples → train / validation JSONL + report (what process_image.py runs).

Steps, in order:
1. check the `data` config and that every annotations file and image folder exists (before any work);
2. convert each source's rows (one converter per format), dropping repeated ids within a source;
3. decode every distinct image once (worker processes) and drop the samples with a bad image: the check is
   `visual.load_image`, the reader training and inference use, so all stages agree on what a good image
   is; JPEGs are decoded at a reduced scale (libjpeg DCT scaling; the whole file is still read and
   entropy-decoded, so truncation is still caught) to keep a 10k px photo from costing gigabytes;
4. split off the validation samples (deterministic from the seed) and publish the training and validation
   files as one set (`common.fileset.publish_together`: both paths are links through one pointer, switched
   by a single rename), then write the report whole: a crash never leaves a half-written file, nor a
   training file of one run beside a validation file of another.
Same inputs and seed give byte-identical files, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.fileio import write_files
from common.fileset import publish_together, remove_partials
from common.paths import same_file
from dataprocess.aic import convert_aic
from dataprocess.llava import convert_llava
from dataprocess.report import build_report, source_entry
from dataprocess.schema import DUPLICATE_ID, IMAGE_MISSING, IMAGE_UNREADABLE, Drop, Kept, to_json_line
from settings import ConfigError, DataConfig, DataSource
from visual.images import ImageLoadError, load_image

FORMATS = ("aic", "llava")
VAL_MAX_PERCENT = 5
CHECK_DRAFT_SIZE = (1, 1)  # smallest scale libjpeg offers (1/8 of each side)

# (reason, detail) with reason from ImageLoadError ("missing", "not a file", "not an image", "corrupt",
# "too large", or "unexpected error" for anything the reader did not classify); None for a good image.
ImageProblem = tuple[str, str] | None


class PathError(Exception):
    """A data file or folder (annotations, images, outputs) that cannot be used; the message names the path."""


# --------------------------------------------------------------------------------------------------
# Config and inputs
# --------------------------------------------------------------------------------------------------


def source_name(src: DataSource) -> str:
    return src.name or Path(src.annotations).stem


def check_data_config(cfg: DataConfig) -> None:
    """Value checks the typed loader cannot do (formats, ranges, unique names); raises ConfigError."""
    if not cfg.sources:
        raise ConfigError("data.sources: at least one source is needed")
    seen: dict[str, int] = {}
    for i, src in enumerate(cfg.sources):
        if src.format not in FORMATS:
            raise ConfigError(f"data.sources[{i}].format: {src.format!r} is not one of {', '.join(FORMATS)}")
        if src.limit is not None and src.limit < 0:
            raise ConfigError(f"data.sources[{i}].limit: must be >= 0, got {src.limit}")
        name = source_name(src)
        if name in seen:
            raise ConfigError(
                f"data.sources[{i}]: source name {name!r} is also used by data.sources[{seen[name]}];"
                " give one of them a distinct 'name'"
            )
        seen[name] = i
    if cfg.val_size < 0:
        raise ConfigError(f"data.val_size: must be >= 0, got {cfg.val_size}")
    if cfg.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {cfg.num_workers}")
    if not cfg.output:
        raise ConfigError("data.output: a file path is needed")
    outputs = [cfg.output, cfg.resolved_val_output(), report_path(cfg)]
    if len({os.path.abspath(p) for p in outputs}) != len(outputs):
        raise ConfigError(f"data.output and data.val_output must be different files: {outputs[0]}")


def check_inputs(cfg: DataConfig) -> None:
    """Every annotations file and image folder exists, and the outputs are neither folders nor one of the
    annotations files (compared resolved: links, relative paths); raises PathError."""
    for src in cfg.sources:
        if not os.path.isfile(src.annotations):
            raise PathError(f"annotations file not found: {src.annotations} (source {source_name(src)!r})")
        if not os.path.isdir(src.image_dir):
            raise PathError(f"image folder not found: {src.image_dir} (source {source_name(src)!r})")
    outputs = {"data.output": cfg.output, "the validation output": cfg.resolved_val_output(),
               "the report": report_path(cfg)}
    for label, path in outputs.items():
        if os.path.isdir(path):
            raise PathError(f"output path is a folder: {path}")
        for src in cfg.sources:
            if same_file(path, src.annotations):
                raise PathError(
                    f"{label} {path} is the annotations file of source {source_name(src)!r}: an output is never "
                    "one of the inputs; write it elsewhere"
                )


def read_rows(path: str) -> list[Any]:
    """The rows of a JSON annotations file (a list at the top level); raises PathError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except UnicodeDecodeError as e:
        raise PathError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise PathError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except OSError as e:
        raise PathError(f"{path}: cannot be read ({e.strerror})") from e
    if not isinstance(rows, list):
        raise PathError(f"{path}: expected a JSON list of rows, got a JSON {type(rows).__name__}")
    return rows


def report_path(cfg: DataConfig) -> str:
    return cfg.output + ".report.json"


# --------------------------------------------------------------------------------------------------
# Conversion and checks
# --------------------------------------------------------------------------------------------------


@dataclass
class SourceResult:
    src: DataSource
    name: str
    rows: int  # rows in the file
    skipped: int  # rows after `limit`, not converted
    kept: list[Kept] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)


def convert(src: DataSource, rows: list[Any], seed: int) -> Iterator[Kept | Drop]:
    name = source_name(src)
    if src.format == "aic":
        return convert_aic(rows, src.image_dir, name, seed)
    return convert_llava(rows, src.image_dir, name)


def convert_source(src: DataSource, rows: list[Any], seed: int) -> SourceResult:
    used = rows if src.limit is None else rows[: src.limit]
    result = SourceResult(src, source_name(src), rows=len(rows), skipped=len(rows) - len(used))
    first_row: dict[str, int] = {}
    for item in convert(src, used, seed):
        if isinstance(item, Drop):
            result.drops.append(item)
        elif item.raw_id in first_row:
            result.drops.append(
                Drop(DUPLICATE_ID, item.row, item.raw_id, f"same id as row {first_row[item.raw_id]}")
            )
        else:
            first_row[item.raw_id] = item.row
            result.kept.append(item)
    return result


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


def image_drop(item: Kept, problems: dict[str, tuple[str, str] | None]) -> Drop | None:
    """A drop for the sample's first bad image, or None if all its images are good."""
    for path in item.sample["images"]:
        problem = problems[path]
        if problem is not None:
            reason, detail = problem
            label = IMAGE_MISSING if reason == "missing" else IMAGE_UNREADABLE
            text = f"{path}: {reason}" + (f" ({detail})" if detail else "")
            return Drop(label, item.row, item.raw_id, text[:300])
    return None


def split_validation(samples: list[dict[str, Any]], val_size: int, seed: int) -> tuple[list, list]:
    """(train, val), both in input order. `val_size` samples, at most 5% of them, at least 1 if there are 2.

    A sample is chosen by the SHA-256 of (seed, id), so adding data barely changes the choice; samples
    whose images no other sample uses come first, so that no image is in both files when avoidable.
    """
    n = len(samples)
    n_val = 0 if val_size == 0 or n < 2 else max(1, min(val_size, n * VAL_MAX_PERCENT // 100))
    uses = Counter(p for s in samples for p in set(s["images"]))

    def rank(i: int) -> tuple[bool, str]:
        shared = any(uses[p] > 1 for p in samples[i]["images"])
        return shared, hashlib.sha256(f"{seed}:{samples[i]['id']}".encode()).hexdigest()

    chosen = set(sorted(range(n), key=rank)[:n_val])
    train = [s for i, s in enumerate(samples) if i not in chosen]
    val = [s for i, s in enumerate(samples) if i in chosen]
    return train, val


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_outputs(pair: dict[str, Iterable[str]] | None, report: dict[str, Iterable[str]]) -> None:
    """Publish the training and validation files as one set (when there are samples), then write the report
    whole; an OS error (no permission, disk full) becomes a PathError naming the files."""
    try:
        if pair:
            publish_together(pair)
        write_files(report)
        for path in report:
            remove_partials(path)  # what a killed run left
    except OSError as e:
        names = [*(pair or {}), *report]
        raise PathError(f"cannot write {', '.join(names)}: {e.strerror or e}") from e


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


@dataclass
class ProcessResult:
    report: dict[str, Any]  # what is written to <output>.report.json
    seconds: dict[str, float]  # wall time per stage (printed, never written: outputs stay reproducible)


def process(cfg: DataConfig, progress: bool = True) -> ProcessResult:
    """Run everything; raises ConfigError / PathError before converting anything if the config, a path or an
    annotations file is wrong.

    If no sample at all is kept, only the report is written (an earlier good output is not replaced).
    """
    check_data_config(cfg)
    check_inputs(cfg)
    seconds = {}

    t = time.perf_counter()
    raw_rows = [read_rows(src.annotations) for src in cfg.sources]  # every file parses before any work
    results = [convert_source(src, rows, cfg.seed) for src, rows in zip(cfg.sources, raw_rows)]
    seconds["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = [p for r in results for item in r.kept for p in item.sample["images"]]
    problems = check_images(paths, cfg.num_workers, progress=progress)
    seconds["images"] = time.perf_counter() - t

    samples = []
    for r in results:
        good = []
        for item in r.kept:
            drop = image_drop(item, problems)
            if drop is None:
                good.append(item)
            else:
                r.drops.append(drop)
        r.kept = good
        samples.extend(item.sample for item in good)

    train, val = split_validation(samples, cfg.val_size, cfg.seed)
    outputs = {"train": cfg.output, "val": cfg.resolved_val_output()} if samples else None
    sources = [
        source_entry(
            name=r.name,
            fmt=r.src.format,
            annotations=r.src.annotations,
            image_dir=r.src.image_dir,
            rows=r.rows,
            skipped=r.skipped,
            kept=len(r.kept),
            drops=r.drops,
        )
        for r in results
    ]
    report = build_report(
        seed=cfg.seed,
        sources=sources,
        n_train=len(train),
        n_val=len(val),
        outputs=outputs,
        images_checked=len(problems),
        images_bad=sum(p is not None for p in problems.values()),
    )

    t = time.perf_counter()
    pair = {cfg.output: map(to_json_line, train), cfg.resolved_val_output(): map(to_json_line, val)}
    write_outputs(pair if samples else None,
                  {report_path(cfg): [json.dumps(report, ensure_ascii=False, indent=2) + "\n"]})
    seconds["write"] = time.perf_counter() - t
    return ProcessResult(report, seconds)
