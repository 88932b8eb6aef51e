"""Training checkpoints that are complete or recognisably not, which one a run resumes from, and what a new run
may do with an output folder that is not empty.

A checkpoint `<output_dir>/checkpoint-N` is written by several hands: our bundle (`model/bundle.py`), the
Trainer's optimizer, scheduler and RNG states (one per rank) and its `trainer_state.json`. Once every rank has
written its part and every file is flushed to disk (fsync: the bundle by its writer, each rank's own files by that
rank, the rest when the checkpoint is sealed), `checkpoint_complete.json` is written last, whole
(temporary file, fsync, rename), listing every file and its size. A checkpoint is complete when that record is
there and every file it lists has its size: a save cut short by a crash or SIGKILL has no record, and a file
truncated afterwards no longer matches it. `--resume_from_checkpoint latest` takes the newest complete one and
says which newer ones it passed over; a named checkpoint that is incomplete is refused with the reason.

A resume restores some settings from the checkpoint whatever the command line says: the optimizer's parameter
groups (optimizer.pt: each group's learning rate, which the restored schedule (scheduler.pt) keeps as its peak,
weight decay, Adam betas and epsilon) and the Trainer's step intervals (trainer_state.json: logging, evaluation
and save steps). `check_resume_settings` refuses a resume whose command line asks for other values of these,
which would silently not apply. What the command line does change on a resume: the schedule's length and shape
(max_steps or epochs, warmup, scheduler type: recomputed from the new values), the batch size and everything else.

A run never silently replaces another: `check_output_dir` refuses a non-empty output folder unless the run
resumes (it continues the run in that folder) or `--overwrite_output_dir` says so; `clear_previous_run` then
deletes what a run writes there (checkpoints, the final bundle, metrics, evaluation results, logs), so that no
file describes a model that no longer exists, and leaves anything else.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

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


class ResumeSettingsError(ValueError):
    """A resume asked for settings that the checkpoint's restored state would override."""


# --------------------------------------------------------------------------------------------------
# Complete or not
# --------------------------------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder (subfolders included, e.g. DeepSpeed's), but no hidden staging leftover."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts) and p.name != COMPLETE_FILE)


# Files whose writers flush them to disk, which sealing does not flush again: the bundle (model/bundle.py writes it
# through common.fileio.staged_files, which fsyncs each file) and each rank's own files (`rank_files`).
BUNDLE_FILES = (BUNDLE_CONFIG_FILE, PROJECTOR_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
RANK_FILE_PATTERNS = ("rng_state_{rank}.pth", "global_step*/*zero_pp_rank_{rank}_*")


def rank_files(folder: str | os.PathLike, rank: int) -> list[Path]:
    """The files of a checkpoint that process `rank` wrote for itself, which it flushes before the checkpoint is
    sealed: its RNG state (with several processes; one process writes rng_state.pth) and its DeepSpeed optimizer
    shard."""
    return [p for pattern in RANK_FILE_PATTERNS for p in Path(folder).glob(pattern.format(rank=rank))]


def _flushed_by_writer(name: str) -> bool:
    """Whether the checkpoint file `name` (relative, "/"-separated) is one that its writer flushed."""
    return name in BUNDLE_FILES or any(fnmatch.fnmatchcase(name, p.format(rank="*")) for p in RANK_FILE_PATTERNS)


def seal_checkpoint(folder: str | os.PathLike, global_step: int) -> Path:
    """Flush the files of `folder` that their writers did not (the Trainer's optimizer, scheduler and state, ...) to
    disk, then write `checkpoint_complete.json` (whole) listing every file."""
    folder = Path(folder)
    files = {}
    for path in checkpoint_files(folder):
        name = path.relative_to(folder).as_posix()
        if not _flushed_by_writer(name):
            fsync_file(path)
        files[name] = path.stat().st_size
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
# What a resume restores
# --------------------------------------------------------------------------------------------------

# The setting behind each optimizer group's learning rate, by the group's side (training/trainer.py names the groups
# "<side>/decay" and "<side>/no_decay").
GROUP_LEARNING_RATES = {"llm": "learning_rate", "projector": "projector_learning_rate"}
RESTORED_SETTINGS = ("learning_rate", "projector_learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "logging_steps", "eval_steps", "save_steps")


def restored_settings(checkpoint: str | os.PathLike, args) -> dict[str, float]:
    """The training settings that resuming from `checkpoint` takes from it, with the checkpoint's values: the
    optimizer groups' (peak) learning rates, weight decay, Adam betas and epsilon from optimizer.pt, and the
    logging, evaluation and save steps of trainer_state.json where `args` counts them in steps (a fraction of the
    run is not compared). A checkpoint without optimizer.pt (DeepSpeed keeps its own) gives only the latter."""
    folder = Path(checkpoint)
    found: dict[str, float] = {}
    if (folder / "optimizer.pt").is_file():  # mmap: only the small parameter-group records are read
        groups = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)["param_groups"]
        for group in groups:
            side, _, decay = str(group.get("name", "")).partition("/")
            if side in GROUP_LEARNING_RATES:
                found[GROUP_LEARNING_RATES[side]] = group.get("initial_lr", group["lr"])  # the schedule's peak
            if decay == "decay":
                found["weight_decay"] = group["weight_decay"]
            if isinstance(group.get("betas"), (list, tuple)) and len(group["betas"]) == 2:
                found["adam_beta1"], found["adam_beta2"] = group["betas"]
            if isinstance(group.get("eps"), float):
                found["adam_epsilon"] = group["eps"]
    state = json.loads((folder / "trainer_state.json").read_text())
    for kind in ("logging", "eval", "save"):
        wanted, saved = getattr(args, f"{kind}_steps", None), state.get(f"{kind}_steps")
        in_steps = getattr(args, f"{kind}_strategy", None) == "steps" and wanted is not None and wanted >= 1
        if in_steps and saved is not None:
            found[f"{kind}_steps"] = saved
    return found


def check_resume_settings(checkpoint: str | None, args) -> None:
    """ResumeSettingsError naming every setting of `args` that differs from what resuming from `checkpoint`
    restores (`restored_settings`): it would not apply, and the run would go on at the checkpoint's values."""
    if not checkpoint:
        return
    restored = restored_settings(checkpoint, args)
    differ = [f"{name} {getattr(args, name):g} (the checkpoint's: {restored[name]:g})"
              for name in RESTORED_SETTINGS
              if name in restored and not math.isclose(float(getattr(args, name)), float(restored[name]), rel_tol=1e-6)]
    if differ:
        raise ResumeSettingsError(
            f"cannot resume from {checkpoint} with {', '.join(differ)}: a resume restores these from the checkpoint "
            "(optimizer, learning-rate schedule, trainer state), so the new values would not apply. Resume with the "
            "checkpoint's values, or start a new run with the new ones (another --output_dir, or "
            "--overwrite_output_dir)")


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
