"""The two training stages (LLaVA's recipe): `align` trains the projector alone on image-caption pairs, so that
image features land where the frozen LLM can read them; `instruct` then trains LoRA + projector on instructions,
starting from the aligned projector.

- `prepare_align`: the align stage's model: no LoRA at all, every parameter frozen but the projector's.
- `load_start_projector`: the projector that starts a stage (`model.projector_path`), loaded exactly (also into a
  model built under DeepSpeed ZeRO-3); a folder without one, or one of another shape or image setting, is refused
  with one line.
- `resolve_sources` / `sample_filter`: which processed samples a stage trains on (the `source` field of each
  sample holds its source's name; a config may name sources by name or by format).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataprocess.pipeline import source_name
from model.bundle import PROJECTOR_FILE, load_projector, unwrap
from model.config import BUNDLE_CONFIG_FILE, VLMConfig, differences
from settings import ConfigError
from settings.sections import DataConfig

from .distributed import gathered


def prepare_align(model, verbose: bool = True):
    """The align stage's model: `model` (a VisionLanguageModel) with every parameter frozen except the projector's;
    no LoRA is applied. Returns the model."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"align stage: only the projector trains ({trainable:,} of {total:,} parameters); no LoRA, the LLM "
              "and the vision tower are frozen")
    return model


def check_projector_folder(folder: str | Path) -> Path:
    """`folder` if it holds a projector file, else FileNotFoundError (one line naming the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.projector_path: folder not found: {folder} (run the align stage first: "
                                "`python train.py --config CONFIG --stage align`, or set model.projector_path)")
    if not (folder / PROJECTOR_FILE).is_file():
        raise FileNotFoundError(f"model.projector_path: {folder} has no {PROJECTOR_FILE} (expected an align run's "
                                "output_dir, or a checkpoint bundle)")
    return folder


def load_start_projector(model, folder: str | Path, current: VLMConfig, verbose: bool = True) -> None:
    """Load the projector of `folder` (an align run's output_dir, or any bundle or checkpoint) into `model` (the
    VisionLanguageModel, or a wrapper), exactly. What the projector's weights mean must agree
    (`VLMConfig.projector_input`: the tower, its layer and rows, the LLM's width); the base folders may differ
    (another machine), which is only noted. FileNotFoundError / ValueError, each one line naming the folder."""
    folder = check_projector_folder(folder)
    if (folder / BUNDLE_CONFIG_FILE).is_file():
        saved = VLMConfig.load(folder)
        problems = differences(saved.projector_input(), current.projector_input())
        if problems:
            raise ValueError(f"model.projector_path: the projector of {folder} was trained for another model: "
                             + "; ".join(problems))
        moved = [name for name, there, now in zip(("text", "vision"), saved.resolve(folder),
                                                   (current.text.path, current.vision.path))
                 if Path(there) != Path(now)]
        if moved and verbose:
            print(f"train.py: note: the projector of {folder} was trained with other base folders ({', '.join(moved)}"
                  "); its shapes fit")
    projector = unwrap(model).projector
    try:
        with gathered(projector.parameters()):  # built under DeepSpeed ZeRO-3: whole while loaded, then sharded again
            load_projector(unwrap(model), folder)
    except ValueError as e:
        raise ValueError(f"model.projector_path: {e}") from e
    if verbose:
        print(f"projector loaded from {folder / PROJECTOR_FILE}")


def resolve_sources(entries: Sequence[str], data: DataConfig | None) -> list[str]:
    """The source names (the `source` field of processed samples) that `entries` select: each entry is the name
    or the format of one or more of `data.sources`; without a data section, entries are taken as names."""
    if data is None:
        return list(dict.fromkeys(entries))
    formats = {source_name(src): src.format for src in data.sources}
    chosen: list[str] = []
    for entry in entries:
        matched = [name for name, fmt in formats.items() if entry in (name, fmt)]
        if not matched:
            raise ConfigError(f"sources: {entry!r} is neither the name nor the format of a data source (names: "
                              f"{', '.join(formats)}; formats: {', '.join(sorted(set(formats.values())))})")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def sample_filter(sources: Sequence[str] | None, *, need_images: bool) -> Callable[[dict[str, Any]], bool] | None:
    """The dataset's `keep`: samples of `sources` (None: every source), and with `need_images` only those with an
    image (the align stage: a text-only sample would give the projector no gradient). None keeps everything."""
    if sources is None and not need_images:
        return None
    names = None if sources is None else frozenset(sources)

    def keep(sample: dict[str, Any]) -> bool:
        return (names is None or sample["source"] in names) and (not need_images or bool(sample["images"]))

    return keep
