"""Reading the vision half of a local checkpoint folder, whatever the tower family (CLIP, SigLIP).

What every family shares: `config.json` names the model type; the weights are in `model.safetensors`, or in
shards listed by `model.safetensors.index.json`; the vision tensors carry the `vision_model.` prefix (in a
full two-tower checkpoint and in a saved vision-only model alike); pickled weights (`pytorch_model.bin`) are
never opened. The check is strict and loud: every tensor of the family's full vision model must be in the files
with its shape, and a vision tensor that model does not know is an error too; every message names the folder
and the tensor. Other tensors (a text tower, projections, logit scale) are skipped.

Only headers are read here (`safe_open` metadata); `read_vision_tensors` reads the tensors a tower asks for.
`kind` ("CLIP", "SigLIP", "vision") starts each message: "CLIP checkpoint /path: missing tensor ...".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

CHECKPOINT_PREFIX = "vision_model."  # key prefix of the vision tensors in full and vision-only checkpoints
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Older checkpoints (openai/clip-* among them) may store this buffer; transformers rebuilds it.
IGNORED_VISION_KEYS = {"embeddings.position_ids"}

# name without the prefix -> (file holding it, shape)
TensorLocations = dict[str, tuple[Path, tuple[int, ...]]]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot give a correct vision tower; the message names folder and tensor."""


def read_json(path: Path, folder: Path, kind: str) -> dict:
    """The JSON object in `path` (a file of `folder`); CheckpointError if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{kind} checkpoint {folder}: {path.name} is not valid JSON ({e})") from e


def read_model_type(folder: Path, kind: str):
    """`model_type` of the folder's config.json (None when absent), after checking folder and file exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{kind} checkpoint folder {folder} does not exist (weights load from local folders only)"
        )
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{kind} checkpoint {folder}: {CONFIG_FILE} is missing")
    config = read_json(config_file, folder, kind)
    if not isinstance(config, dict):
        raise CheckpointError(f"{kind} checkpoint {folder}: {CONFIG_FILE} is not a JSON object")
    return config.get("model_type")


def safetensors_files(folder: Path, kind: str) -> list[Path]:
    """The safetensors file(s) holding the weights of `folder`, checked to exist."""
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index, folder, kind).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{kind} checkpoint {folder}: {SAFETENSORS_INDEX} has no 'weight_map'")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(
                    f"{kind} checkpoint {folder}: shard {shard.name} listed in {SAFETENSORS_INDEX} is missing"
                )
        return shards
    pickles = [name for name in PICKLE_FILES if (folder / name).is_file()]
    if pickles:
        raise CheckpointError(
            f"{kind} checkpoint {folder} has only pickled weights ({pickles[0]}), which this project never "
            f'unpickles. Convert them once to {SAFETENSORS_FILE}, e.g.: python -c "import torch; '
            f"from safetensors.torch import save_file; save_file(torch.load('pytorch_model.bin', "
            f"weights_only=True), 'model.safetensors', metadata={{'format': 'pt'}})\""
        )
    raise CheckpointError(
        f"{kind} checkpoint {folder}: no weights file ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX})"
    )


def vision_tensor_locations(files: list[Path]) -> TensorLocations:
    """Name (without the `vision_model.` prefix) -> (file, shape) of every vision tensor; reads headers only."""
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.startswith(CHECKPOINT_PREFIX):
                    found[key[len(CHECKPOINT_PREFIX) :]] = (file, tuple(f.get_slice(key).get_shape()))
    return found


def expected_vision_tensors(model_class: type[nn.Module], config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of `model_class(config)` (built on the meta device: no
    memory, no initialisation)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}


def check_vision_tensors(
    folder: Path, expected: Mapping[str, tuple[int, ...]], found: TensorLocations, kind: str
) -> None:
    """Every expected tensor must be in the files with its shape, and no other vision tensor may be."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(
                f"{kind} checkpoint {folder}: missing tensor {CHECKPOINT_PREFIX}{name} {list(shape)}"
            )
        file, got = found[name]
        if got != shape:
            raise CheckpointError(
                f"{kind} checkpoint {folder}: tensor {CHECKPOINT_PREFIX}{name} in {file.name} has shape "
                f"{list(got)}, the config ({CONFIG_FILE}) needs {list(shape)}"
            )
    for name in sorted(set(found) - set(expected) - IGNORED_VISION_KEYS):
        raise CheckpointError(f"{kind} checkpoint {folder}: unexpected tensor {CHECKPOINT_PREFIX}{name}")


def read_vision_tensors(
    files: list[Path], found: TensorLocations, wanted: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Read the tensors named by `wanted` (checkpoint name without prefix -> name in the result), file by file."""
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name, target in wanted.items():
                if found[name][0] == file:
                    tensors[target] = f.get_tensor(CHECKPOINT_PREFIX + name)
    return tensors
