"""What every frozen vision tower shares; a family (CLIP, SigLIP) is a subclass in its own file.

A tower is the first layers of a transformers vision model, loaded from a local checkpoint folder by
`from_pretrained` (strict and loud, through `visual.checkpoint`), frozen: no parameter requires grad, it stays in
eval mode when a parent module calls `.train()`, and `forward` runs under `torch.no_grad()`. Only the encoder
layers whose output is used are built and run: `feature_layer` indexes transformers' `hidden_states` (0 = the
embeddings, L = the last layer; negatives count from the end).

A subclass names its family (`family`, `label`, `model_types`), its transformers classes (`config_class`,
`model_class`: the full vision model whose tensors a checkpoint must hold), how many image tokens a config gives
(`num_image_tokens`), how its image processor must fit it (`check_processor`), which modules of the truncated
model it keeps (`_keep`) and how they compute the features (`_features`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .checkpoint import (
    CheckpointError,
    TensorLocations,
    check_vision_tensors,
    expected_vision_tensors,
    read_model_type,
    read_vision_tensors,
    safetensors_files,
    vision_tensor_locations,
)
from .images import PREPROCESSOR_CONFIG, ImagePreprocessor


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
    """hidden_states index (0 = embeddings, L = last layer; negatives count from the end) -> layers to run."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"feature_layer {feature_layer} is out of range for a tower with {num_layers} layers "
            f"(hidden_states has {num_layers + 1} entries: {-(num_layers + 1)}..{num_layers})"
        )
    return feature_layer % (num_layers + 1)


class FrozenVisionTower(nn.Module):
    """Frozen ViT: `forward(pixel_values [N, 3, S, S]) -> [N, num_patches, hidden_size]`."""

    family: ClassVar[str]  # the registry's name: "clip", "siglip"
    label: ClassVar[str]  # how messages name it: "CLIP checkpoint /path: ..."
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values of its folders
    config_class: ClassVar[type]  # transformers' vision config
    model_class: ClassVar[type]  # transformers' full vision model (the tensors a checkpoint must hold)
    # transformers' LLaVA name for the rows the tower keeps: "default" drops the first (CLS), "full" keeps all.
    feature_select_strategy: ClassVar[str]

    def __init__(self, config, feature_layer: int = -2):
        """Build the tower with uninitialised weights; use `from_pretrained` to get a usable one."""
        super().__init__()
        self._config = config
        self._feature_layer = feature_layer
        self.num_layers_run = resolve_feature_layer(feature_layer, config.num_hidden_layers)
        # The family's vision model with only the layers we run; constructing it through transformers sets up
        # the attention implementation (SDPA) as from_pretrained would.
        with no_init_weights():
            vision_model = self.model_class(self._truncated_config(config, self.num_layers_run))
        self._keep(vision_model)
        self.requires_grad_(False)
        self.eval()

    # The family's parts (subclasses) ------------------------------------------------------------------

    @classmethod
    def num_image_tokens(cls, config) -> int:
        """Feature rows per image of a tower with this config: the placeholder ids one image expands to."""
        raise NotImplementedError

    @classmethod
    def check_processor(cls, folder: Path, config, processor: ImagePreprocessor) -> None:
        """Raise CheckpointError unless `processor` gives the pixels this tower takes."""
        raise NotImplementedError

    @classmethod
    def feature_model_config(cls, config):
        """The config of the family's whole vision model (`model_class`, every layer) without the parts that never
        feed the features where the config can leave them out (SigLIP's pooling head): the vision model a
        transformers-native LLaVA builds, which takes the features from its hidden_states."""
        return config

    @classmethod
    def _truncated_config(cls, config, num_layers: int):
        """The config of the vision model built in __init__: `num_layers` encoder layers."""
        truncated = copy.deepcopy(cls.feature_model_config(config))
        truncated.num_hidden_layers = num_layers
        return truncated

    def _keep(self, vision_model: nn.Module) -> None:
        """Take the modules `_features` uses from the truncated vision model."""
        raise NotImplementedError

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] in self.dtype -> features [N, num_patches, hidden]."""
        raise NotImplementedError

    @staticmethod
    def _tower_key(checkpoint_name: str) -> str:
        """Checkpoint name (prefix stripped) -> the tower's own state-dict name (`encoder.layers.i` -> `layers.i`)."""
        return checkpoint_name.removeprefix("encoder.")

    # Reading a folder --------------------------------------------------------------------------------

    @classmethod
    def vision_config(cls, folder: str | os.PathLike):
        """The vision config of a checkpoint folder of this family (a full two-tower model's or a vision-only
        model's config.json), read without touching the weights. Raises CheckpointError naming the problem."""
        folder = Path(folder)
        model_type = read_model_type(folder, cls.label)
        if model_type not in cls.model_types:
            expected = " or ".join(repr(t) for t in cls.model_types)
            raise CheckpointError(
                f"{cls.label} checkpoint {folder}: config.json has model_type {model_type!r}, expected {expected}"
            )
        return cls.config_class.from_pretrained(folder, local_files_only=True)

    @classmethod
    def check_preprocessor_fits(cls, folder: Path, config) -> None:
        """The folder's image processor (when it has one) must give the pixels the tower takes. Found at load,
        not as a shape assert at the first training step."""
        if not (Path(folder) / PREPROCESSOR_CONFIG).is_file():
            return
        cls.check_processor(Path(folder), config, cls._read_processor(Path(folder)))

    @classmethod
    def image_preprocessor(cls, folder: str | os.PathLike) -> ImagePreprocessor:
        """The folder's own image processor (preprocessor_config.json), checked to fit the folder's tower."""
        folder = Path(folder)
        config = cls.vision_config(folder)
        if not (folder / PREPROCESSOR_CONFIG).is_file():
            raise CheckpointError(f"{cls.label} checkpoint {folder}: {PREPROCESSOR_CONFIG} is missing")
        processor = cls._read_processor(folder)
        cls.check_processor(folder, config, processor)
        return processor

    @classmethod
    def _read_processor(cls, folder: Path) -> ImagePreprocessor:
        try:
            return ImagePreprocessor.from_pretrained(folder)
        except ValueError as e:
            raise CheckpointError(f"{cls.label} checkpoint {folder}: {e}") from e

    @classmethod
    def inspect_checkpoint(cls, folder: str | os.PathLike) -> tuple[object, list[Path], TensorLocations]:
        """Check a checkpoint folder from its config, its image processor and the safetensors headers alone (no
        tensor is read): -> (vision config, weight files, vision tensor locations). Raises CheckpointError naming
        the problem."""
        folder = Path(folder)
        config = cls.vision_config(folder)
        cls.check_preprocessor_fits(folder, config)
        files = safetensors_files(folder, cls.label)
        found = vision_tensor_locations(files)
        check_vision_tensors(folder, expected_vision_tensors(cls.model_class, config), found, cls.label)
        return config, files, found

    @classmethod
    def from_pretrained(
        cls, checkpoint_dir: str | os.PathLike, feature_layer: int = -2, dtype: torch.dtype | None = None
    ) -> FrozenVisionTower:
        """Load the vision half of a local checkpoint folder of this family (checked by `inspect_checkpoint`).

        `dtype` defaults to float32 whatever the file stores; pass torch.bfloat16 for GPU training.
        """
        config, files, found = cls.inspect_checkpoint(checkpoint_dir)
        tower = cls(config, feature_layer=feature_layer)
        if dtype is not None:
            tower.to(dtype)
        own = set(tower.state_dict())
        wanted = {name: cls._tower_key(name) for name in found if cls._tower_key(name) in own}
        # strict: each parameter of the truncated tower comes from the file (copy_ casts to dtype).
        tower.load_state_dict(read_vision_tensors(files, found, wanted), strict=True)
        return tower

    # Properties other parts build on ----------------------------------------------------------------

    @property
    def config(self):
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
        return self.num_image_tokens(self._config)

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

    def train(self, mode: bool = True) -> FrozenVisionTower:
        """Always eval: a parent's `.train()` must not switch a frozen tower to training behaviour."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (any float dtype) -> features [N, num_patches, hidden] in self.dtype."""
        size = self.image_size
        assert pixel_values.dim() == 4 and tuple(pixel_values.shape[1:]) == (3, size, size), (
            f"pixel_values must be [N, 3, {size}, {size}], got {list(pixel_values.shape)}"
        )
        return self._features(pixel_values.to(self.dtype))
