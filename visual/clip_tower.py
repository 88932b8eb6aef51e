"""The frozen CLIP vision tower: patch features of one hidden layer, CLS token dropped.

`CLIPVisionTower.from_pretrained(dir)` reads only the vision half (`vision_model.*` tensors) of a
local CLIP checkpoint folder, either a full `CLIPModel` such as openai/clip-vit-large-patch14 or a
saved `CLIPVisionModel`, with its weights in `model.safetensors` or in sharded safetensors with
`model.safetensors.index.json`. Loading is strict and loud: every vision tensor the model needs must
be present with the right shape, and a vision tensor the model does not know is an error too; the
text tower and projection tensors are skipped silently. Pickled weights (`pytorch_model.bin`) are
never opened: the error says how to convert them once.

Only the layers whose output is used are kept: with `feature_layer=-2` (LLaVA's choice, the
penultimate layer) the last encoder layer is not even built, and `post_layernorm` never is (it
only normalises the pooled CLS output, which is not a patch feature). The result equals
`CLIPVisionModel(...)(pixel_values, output_hidden_states=True).hidden_states[feature_layer][:, 1:]`.

The tower is frozen: no parameter requires grad, it stays in eval mode when a parent module calls
`.train()`, and `forward` runs under `torch.no_grad()`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.initialization import no_init_weights

from .images import PREPROCESSOR_CONFIG, CLIPImagePreprocessor

CHECKPOINT_PREFIX = "vision_model."  # key prefix of the vision tensors in CLIPModel and CLIPVisionModel files
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Older checkpoints (openai/clip-* among them) may store this buffer; transformers rebuilds it.
IGNORED_VISION_KEYS = {"embeddings.position_ids"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot give a correct vision tower; the message names folder and tensor."""


def _read_json(path: Path, folder: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"CLIP checkpoint {folder}: {path.name} is not valid JSON ({e})") from e


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors file(s) holding the weights of `folder`, checked to exist."""
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index, folder).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"CLIP checkpoint {folder}: {SAFETENSORS_INDEX} has no 'weight_map'")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(
                    f"CLIP checkpoint {folder}: shard {shard.name} listed in {SAFETENSORS_INDEX} is missing"
                )
        return shards
    pickles = [name for name in PICKLE_FILES if (folder / name).is_file()]
    if pickles:
        raise CheckpointError(
            f"CLIP checkpoint {folder} has only pickled weights ({pickles[0]}), which this project never "
            f'unpickles. Convert them once to {SAFETENSORS_FILE}, e.g.: python -c "import torch; '
            f"from safetensors.torch import save_file; save_file(torch.load('pytorch_model.bin', "
            f"weights_only=True), 'model.safetensors', metadata={{'format': 'pt'}})\""
        )
    raise CheckpointError(
        f"CLIP checkpoint {folder}: no weights file ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX})"
    )


def _vision_tensor_locations(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name (without the `vision_model.` prefix) -> (file, shape) of every vision tensor; reads headers only."""
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.startswith(CHECKPOINT_PREFIX):
                    found[key[len(CHECKPOINT_PREFIX) :]] = (file, tuple(f.get_slice(key).get_shape()))
    return found


def _check_vision_tensors(
    folder: Path, config: CLIPVisionConfig, found: dict[str, tuple[Path, tuple[int, ...]]]
) -> None:
    """Every tensor of a full CLIPVisionModel must be in the file with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CLIPVisionModel(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(
                f"CLIP checkpoint {folder}: missing tensor {CHECKPOINT_PREFIX}{name} {list(shape)}"
            )
        file, got = found[name]
        if got != shape:
            raise CheckpointError(
                f"CLIP checkpoint {folder}: tensor {CHECKPOINT_PREFIX}{name} in {file.name} has shape "
                f"{list(got)}, the config (config.json) needs {list(shape)}"
            )
    for name in sorted(set(found) - set(expected) - IGNORED_VISION_KEYS):
        raise CheckpointError(f"CLIP checkpoint {folder}: unexpected tensor {CHECKPOINT_PREFIX}{name}")


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """hidden_states index (0 = embeddings, L = last layer; negatives count from the end) -> layers to run."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"feature_layer {feature_layer} is out of range for a tower with {num_layers} layers "
            f"(hidden_states has {num_layers + 1} entries: {-(num_layers + 1)}..{num_layers})"
        )
    return feature_layer % (num_layers + 1)


def num_image_tokens(config: CLIPVisionConfig) -> int:
    """Feature rows per image, CLS dropped: the number of placeholder ids one image tag expands to
    ((image_size // patch_size) ** 2: 256 for ViT-L/14 at 224 px). The one place this is computed."""
    if config.patch_size < 1 or config.image_size % config.patch_size:
        raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    return (config.image_size // config.patch_size) ** 2


def vision_config(folder: str | os.PathLike) -> CLIPVisionConfig:
    """The vision config of a CLIP checkpoint folder (a full CLIPModel's or a CLIPVisionModel's config.json),
    read without touching the weights. Raises CheckpointError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"CLIP checkpoint folder {folder} does not exist (weights load from local folders only)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"CLIP checkpoint {folder}: config.json is missing")
    model_type = _read_json(config_file, folder).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise CheckpointError(
            f"CLIP checkpoint {folder}: config.json has model_type {model_type!r}, expected 'clip' or 'clip_vision_model'"
        )
    return CLIPVisionConfig.from_pretrained(folder, local_files_only=True)


def check_preprocessor_fits(folder: Path, config: CLIPVisionConfig) -> None:
    """The folder's image processor (when it has one) must give the pixels the tower takes: a centre crop of
    image_size x image_size. Found at load, not as a shape assert at the first training step."""
    if not (folder / PREPROCESSOR_CONFIG).is_file():
        return
    try:
        processor = CLIPImagePreprocessor.from_pretrained(folder)
    except ValueError as e:
        raise CheckpointError(f"CLIP checkpoint {folder}: {e}") from e
    size = config.image_size
    if not processor.do_center_crop:
        raise CheckpointError(
            f"CLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} has do_center_crop false, so the pixel size would "
            f"depend on each image's shape; the tower (config.json image_size) takes {size}x{size}"
        )
    height, width = processor.crop_size
    if (height, width) != (size, size):
        raise CheckpointError(
            f"CLIP checkpoint {folder}: {PREPROCESSOR_CONFIG} crops images to {height}x{width}, but the tower "
            f"(config.json image_size) takes {size}x{size}; make crop_size {size}"
        )


def inspect_checkpoint(folder: Path) -> tuple[CLIPVisionConfig, list[Path], dict]:
    """Check a CLIP checkpoint folder from its config, its image processor and the safetensors headers alone (no
    tensor is read): -> (vision config, weight files, vision tensor locations). Raises CheckpointError naming
    the problem."""
    folder = Path(folder)
    config = vision_config(folder)
    check_preprocessor_fits(folder, config)
    files = _safetensors_files(folder)
    found = _vision_tensor_locations(files)
    _check_vision_tensors(folder, config, found)
    return config, files, found


class CLIPVisionTower(nn.Module):
    """Frozen CLIP ViT: `forward(pixel_values [N, 3, S, S]) -> [N, num_patches, hidden_size]`."""

    def __init__(self, config: CLIPVisionConfig, feature_layer: int = -2, select_feature: str = "patch"):
        """Build the tower with uninitialised weights; use `from_pretrained` to get a usable one."""
        super().__init__()
        if select_feature != "patch":
            raise ValueError(
                f"select_feature {select_feature!r} is not supported (only 'patch': CLS dropped)"
            )
        self._config = config
        self._feature_layer = feature_layer
        self.select_feature = select_feature
        self.num_layers_run = resolve_feature_layer(feature_layer, config.num_hidden_layers)

        # A CLIPVisionModel with only the layers we run; constructing it through transformers sets up
        # the attention implementation (SDPA) as from_pretrained would. post_layernorm is not kept.
        truncated = copy.deepcopy(config)
        truncated.num_hidden_layers = self.num_layers_run
        with no_init_weights():
            vision_model = CLIPVisionModel(truncated)
        self.embeddings = vision_model.embeddings
        self.pre_layrnorm = vision_model.pre_layrnorm
        self.layers = vision_model.encoder.layers

        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike,
        feature_layer: int = -2,
        dtype: torch.dtype | None = None,
        select_feature: str = "patch",
    ) -> CLIPVisionTower:
        """Load the vision half of a local CLIP checkpoint folder (see the module docstring).

        `dtype` defaults to float32 whatever the file stores; pass torch.bfloat16 for GPU training.
        """
        folder = Path(checkpoint_dir)
        config, files, found = inspect_checkpoint(folder)
        tower = cls(config, feature_layer=feature_layer, select_feature=select_feature)
        if dtype is not None:
            tower.to(dtype)
        wanted = set(tower.state_dict())
        state_dict = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name, (where, _) in found.items():
                    if where == file and _tower_key(name) in wanted:
                        state_dict[_tower_key(name)] = f.get_tensor(CHECKPOINT_PREFIX + name)
        # strict: each parameter of the truncated tower comes from the file (copy_ casts to dtype).
        tower.load_state_dict(state_dict, strict=True)
        return tower

    # Properties other parts build on ----------------------------------------------------------------

    @property
    def config(self) -> CLIPVisionConfig:
        """The checkpoint's vision config (all its layers, even those this tower does not run)."""
        return self._config

    @property
    def feature_layer(self) -> int:
        return self._feature_layer

    @property
    def image_size(self) -> int:
        return self._config.image_size

    @property
    def patch_size(self) -> int:
        return self._config.patch_size

    @property
    def num_patches(self) -> int:
        """Feature rows per image: the number of placeholder tokens one image expands to."""
        return num_image_tokens(self._config)

    @property
    def hidden_size(self) -> int:
        return self._config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    # Frozen behaviour --------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> CLIPVisionTower:
        """Always eval: a parent's `.train()` must not switch a frozen tower to training behaviour."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (any float dtype) -> patch features [N, num_patches, hidden] in self.dtype."""
        size = self.image_size
        assert pixel_values.dim() == 4 and tuple(pixel_values.shape[1:]) == (3, size, size), (
            f"pixel_values must be [N, 3, {size}, {size}], got {list(pixel_values.shape)}"
        )
        hidden = self.embeddings(pixel_values.to(self.dtype))  # [N, 1 + num_patches, hidden]
        hidden = self.pre_layrnorm(hidden)
        for layer in self.layers:
            hidden = layer(hidden, None)  # no attention mask: every patch sees every patch
        return hidden[:, 1:]  # drop CLS: [N, num_patches, hidden]


def _tower_key(checkpoint_name: str) -> str:
    """Checkpoint name (prefix stripped) -> the tower's own state-dict name (`encoder.layers.i` -> `layers.i`)."""
    return checkpoint_name.removeprefix("encoder.")
