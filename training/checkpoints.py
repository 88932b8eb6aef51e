"""Training checkpoints that are complete or recognisably not, which one a run resumes from, and what a new run
may do with an output folder that is not empty.

A checkpoint `<output_dir>/checkpoint-N` is written by several hands: our bundle (`model/bundle.py`), the
Trainer's optimizer, scheduler and RNG states (one per rank) and its `trainer_state.json`. Once every rank has
written its part, each file is flushed to disk (fsync) and `checkpoint_complete.json` is written last, whole
(temporary file, fsync, rename), listing every file and its size. A checkpoint is complete when that record is
there and every file it lists has its size: a save cut short by a crash or SIGKILL has no record, and a file
truncated afterwards no longer matches it. `--resume_from_checkpoint latest` takes the newest complete one and
says which newer ones it passed over; a named checkpoint that is incomplete is refused with the reason.

A run never silently replaces another: `check_output_dir` refuses a non-empty output folder unless the run
resumes (it continues the run in that folder) or `--overwrite_output_dir` says so; `clear_previous_run` then
deletes what a run writes there (checkpoints, the final bundle, metrics, evaluation results, logs), so that no
file describes a model that no longer exists, and leaves anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from common.fileio import fsync_file, write_json
from model.bundle import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BUNDLE_CONFIG_FILE, PROJECTOR_FILE

COMPLETE_FILE = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

# What a training run writes into its output folder (besides checkpoint-N): the final bundle (peft adds a model
# card, README.md), the Trainer's metrics, the demo's and the evaluator's results, TensorBoard logs.
RUN_FILES = (BUNDLE_CONFIG_FILE, PROJECTOR_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "README.md",
             "trainer_state.json", "training_args.bin", "all_results.json", "train_results.json",
             "eval_results.json", "demo_eval.json", "metrics.json", "predictions.jsonl", "report.md")
RUN_FOLDERS = ("runs",)


class CheckpointError(FileNotFoundError):
    """No checkpoint to resume from, or an incomplete one named explicitly."""


class OutputDirError(ValueError):
    """An output folder that a run may not write into."""


# --------------------------------------------------------------------------------------------------
# Complete or not
# --------------------------------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder (subfolders included, e.g. DeepSpeed's), but no hidden staging leftover."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts) and p.name != COMPLETE_FILE)


def seal_checkpoint(folder: str | os.PathLike, global_step: int) -> Path:
    """Flush every file of `folder` to disk, then write `checkpoint_complete.json` (whole) listing them."""
    folder = Path(folder)
    files = {}
    for path in checkpoint_files(folder):
        fsync_file(path)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return write_json(folder / COMPLETE_FILE, {"global_step": int(global_step), "files": files})


def unseal_checkpoint(folder: str | os.PathLike) -> None:
    """Before a checkpoint folder is (re)written: it is incomplete until sealed again."""
    (Path(folder) / COMPLETE_FILE).unlink(missing_ok=True)


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """None for a complete checkpoint, else why it is not (one phrase)."""
    folder = Path(folder)
    record_path = folder / COMPLETE_FILE
    if not folder.is_dir():
        return "not a folder"
    if not record_path.is_file():
        return f"no {COMPLETE_FILE}: its save was interrupted"
    try:
        record = json.loads(record_path.read_text())
        files = dict(record["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"{COMPLETE_FILE} is unreadable"
    for name in (BUNDLE_CONFIG_FILE, "trainer_state.json"):
        if name not in files:
            return f"it has no {name}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder of `output_dir`, newest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The checkpoint folder to resume from and notes to print. `latest` (or `true`): the newest complete
    checkpoint of `output_dir`, the newer incomplete ones named in the notes; a folder: itself, if complete."""
    if not resume:
        return None, []
    notes = []
    if resume.lower() in ("latest", "true"):
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint-N folder in {output_dir}")
        for _, folder in candidates:
            reason = incomplete_reason(folder)
            if reason is None:
                if notes:
                    notes.append(f"resuming from {folder.name}, the newest complete checkpoint")
                return str(folder), notes
            notes.append(f"{folder.name} is incomplete ({reason}): skipped")
        raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir} ("
                              + "; ".join(notes) + ")")
    reason = incomplete_reason(resume)
    if reason is not None:
        raise CheckpointError(f"cannot resume from {resume}: not a complete checkpoint ({reason})")
    return resume, notes


# --------------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, *, resume: str | None, overwrite: bool) -> None:
    """Refuse an output folder that is a file, or one that holds anything when the run neither resumes nor has
    --overwrite_output_dir."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path} is a file, not a folder")
    if resume or overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputDirError(
            f"output_dir {path} is not empty ({shown}): pass --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir to replace it (its checkpoints, bundle and results are deleted), or another "
            "--output_dir"
        )


def clear_previous_run(output_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Delete what a previous run wrote into `output_dir` (checkpoint-N folders, the final bundle, metrics,
    results, TensorBoard logs, staging leftovers). Returns (deleted names, names left alone)."""
    path = Path(output_dir)
    if not path.is_dir():
        return [], []
    deleted, kept = [], []
    for entry in sorted(path.iterdir()):
        ours = (entry.is_dir() and (CHECKPOINT_NAME.match(entry.name) or entry.name in RUN_FOLDERS)) or (
            entry.is_file() and entry.name in RUN_FILES) or (entry.name.startswith(".") and ".partial-" in entry.name)
        if not ours:
            kept.append(entry.name)
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        deleted.append(entry.name)
    return deleted, kept
