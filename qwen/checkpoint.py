"""Checkpoint files in the official layout: read tensor shapes from headers, write (sharded) safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from common.fileio import write_json
from common.safetensors_file import save_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def conversion_command(folder: Path) -> str:
    """A one-line command that rewrites the pickled weights of `folder` as safetensors, beside them (run from the
    repository root; the pickles are read with weights_only=True)."""
    return (
        'python -c "import glob, torch; from pathlib import Path; from qwen.checkpoint import '
        "save_sharded_safetensors as save; sd = {}; [sd.update(torch.load(f, weights_only=True)) for f in "
        f"sorted(glob.glob('{folder}/pytorch_model*.bin'))]; save(sd, Path('{folder}'), max_shard_bytes=2**31)\""
    )


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors checkpoint (one file or sharded), read from the headers only.
    A folder with only pickled weights (`pytorch_model.bin`) is refused: this project never unpickles weights."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        pickles = [name for name in PICKLE_FILES if (folder / name).is_file()] + sorted(
            p.name for p in folder.glob("pytorch_model*.bin"))
        raise ValueError(
            f"QWen checkpoint {folder} has only pickled weights ({pickles[0] if pickles else 'no safetensors'}), "
            f"which this project never unpickles. Convert them once to safetensors: {conversion_command(folder)}"
        )
    shapes = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: shard {name} named in the index is missing")
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes



def save_sharded_safetensors(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    *,
    num_shards: int | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.

    Shards are cut by count (`num_shards`) or by size (`max_shard_bytes`, tensors kept whole, in order).
    Returns the file names written.
    """
    folder = Path(folder)
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    names = list(state_dict)
    sizes = [state_dict[n].numel() * state_dict[n].element_size() for n in names]
    if max_shard_bytes:
        groups, current, used = [], [], 0
        for name, size in zip(names, sizes):
            if current and used + size > max_shard_bytes:
                groups.append(current)
                current, used = [], 0
            current.append(name)
            used += size
        groups.append(current)
    else:
        per = math.ceil(len(names) / max(num_shards or 1, 1))
        groups = [names[i : i + per] for i in range(0, len(names), per)]
    if len(groups) == 1:
        save_safetensors(state_dict, folder / SINGLE_FILE)
        return [SINGLE_FILE]
    weight_map, written = {}, []
    for i, group in enumerate(groups):
        shard_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({n: state_dict[n] for n in group}, folder / shard_name)
        weight_map.update(dict.fromkeys(group, shard_name))
        written.append(shard_name)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    write_json(folder / INDEX_FILE, index)
    return [*written, INDEX_FILE]
