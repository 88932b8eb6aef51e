"""Build the multimodal model from its two base folders, and save/load a trained checkpoint bundle.

A bundle is one self-describing folder:

    vlm_config.json          base model folders, CLIP feature layer, image token count, system prompt
    projector.safetensors    the trained projector
    adapter_config.json      the LoRA adapter in PEFT's own format: `peft.PeftModel.from_pretrained(qwen, folder)`
    adapter_model.safetensors  works on the plain base QWen (embeddings too, when they were trained)

`load_vlm(folder)` rebuilds exactly the trained model. A merged export (`python -m model.export`) has the
same `vlm_config.json` and projector, and QWen weights in the official layout instead of an adapter; it
loads without peft. Everything that knows the bundle's files is here: saving, loading for inference,
restoring the trainable weights when training resumes, and refusing a bundle of another model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from common.fileio import staged_files, write_json
from common.safetensors_file import save_safetensors
from qwen import DEFAULT_SYSTEM, IMAGE_TOKEN_ID, QWenConfig
from settings import ConfigError, build
from visual import CLIPVisionTower

from .modeling_vlm import QWenVLForCausalLM

BUNDLE_CONFIG_FILE = "vlm_config.json"
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
BUNDLE_FORMAT = "qwen-vl-bundle/1"
# What must agree for a bundle's trainable weights to fit a model (resuming, loading the best checkpoint).
IDENTITY_FIELDS = ("llm_path", "vision_path", "vision_feature_layer", "num_image_tokens", "vision_hidden_size",
                   "llm_hidden_size", "image_token_id")
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "modules_to_save")


@dataclass
class BundleConfig:
    llm_path: str  # absolute, or relative to the bundle folder ("." for a merged export)
    vision_path: str
    vision_feature_layer: int
    num_image_tokens: int
    vision_hidden_size: int
    llm_hidden_size: int
    image_token_id: int = IMAGE_TOKEN_ID
    system_prompt: str = DEFAULT_SYSTEM
    merged: bool = False  # True: QWen weights with the LoRA folded in live in the folder itself
    adapter: bool = False  # True: the folder holds a LoRA adapter (adapter_config.json + adapter_model.safetensors)
    format: str = BUNDLE_FORMAT

    def save(self, folder: Path) -> None:
        write_json(folder / BUNDLE_CONFIG_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, folder: Path) -> BundleConfig:
        path = folder / BUNDLE_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint bundle: no {BUNDLE_CONFIG_FILE}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        config = build(cls, raw, str(path))
        if config.format != BUNDLE_FORMAT:
            raise ConfigError(f"{path}: unsupported bundle format {config.format!r} (expected {BUNDLE_FORMAT!r})")
        return config

    def resolve(self, folder: Path) -> tuple[str, str]:
        """Absolute base-model folders (relative ones are taken from the bundle folder)."""
        return tuple(str(p if Path(p).is_absolute() else (folder / p).resolve()) for p in (self.llm_path, self.vision_path))


def build_vlm(
    llm_path: str | os.PathLike,
    vision_path: str | os.PathLike,
    *,
    vision_feature_layer: int = -2,
    dtype: torch.dtype | None = None,
) -> QWenVLForCausalLM:
    """QWen (strictly loaded from its folder) + frozen CLIP tower + a freshly initialised fp32 projector."""
    tower = CLIPVisionTower.from_pretrained(vision_path, feature_layer=vision_feature_layer, dtype=dtype)
    config = QWenConfig.from_pretrained(llm_path)
    config.vision_hidden_size = tower.hidden_size
    config.image_token_id = IMAGE_TOKEN_ID  # the model reads its placeholder id from its config, like LLaVA
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = QWenVLForCausalLM.from_pretrained(llm_path, config=config, **kwargs)
    model.projector.float()  # trainable master weights stay fp32; bf16 compute comes from autocast
    model.attach_vision_tower(tower)
    return model


def bundle_config_for(model: QWenVLForCausalLM, llm_path, vision_path, system_prompt: str) -> BundleConfig:
    tower = model.vision_tower
    return BundleConfig(
        llm_path=str(Path(llm_path).resolve()),
        vision_path=str(Path(vision_path).resolve()),
        vision_feature_layer=tower.feature_layer,
        num_image_tokens=tower.num_patches,
        vision_hidden_size=tower.hidden_size,
        llm_hidden_size=model.config.hidden_size,
        image_token_id=model.image_token_id,
        system_prompt=system_prompt,
    )


def unwrap(model) -> QWenVLForCausalLM:
    """The QWenVLForCausalLM inside a PeftModel / DDP wrapper (or the model itself)."""
    while not isinstance(model, QWenVLForCausalLM):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"not a QWenVLForCausalLM (or a wrapper of one): {type(model).__name__}")
    return model


def save_bundle(model, folder: str | os.PathLike, config: BundleConfig, state_dict: dict | None = None) -> Path:
    """Write adapter (if the model is a PeftModel), projector and config into `folder`.

    Files are written aside first and moved in one by one, the config last: an interrupted save leaves no
    half-written file, and a folder without vlm_config.json is recognisably incomplete. Other files already
    in `folder` (the Trainer's optimizer state, say) are left alone. `state_dict`: whole tensors named as in
    `model.state_dict()`, at least the trained ones, for a model whose own parameters are shards (DeepSpeed
    ZeRO-3, FSDP); the adapter and the projector are then taken from it.
    """
    folder = Path(folder)
    (folder / BUNDLE_CONFIG_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new config lands
    with staged_files(folder, last=(BUNDLE_CONFIG_FILE,)) as staging:
        has_adapter = hasattr(model, "peft_config")
        if has_adapter:
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        projector = unwrap(model).projector
        if state_dict is None:
            weights = projector.state_dict()
        else:
            prefix = next(name for name, module in model.named_modules() if module is projector) + "."
            weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            if missing := sorted(set(projector.state_dict()) - set(weights)):
                raise ValueError(f"save_bundle: state_dict lacks the projector's {missing}")
        save_safetensors({k: v.detach().float().contiguous() for k, v in weights.items()}, staging / PROJECTOR_FILE)
        dataclasses.replace(config, adapter=has_adapter).save(staging)
    return folder


def load_projector(model: QWenVLForCausalLM, folder: Path) -> None:
    path = folder / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: missing {PROJECTOR_FILE}")
    state = load_file(str(path))
    expected = model.projector.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"{path} does not fit the model: {problems}")
    model.projector.load_state_dict({k: v.float() for k, v in state.items()})


def load_vlm(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    merge_lora: bool = True,
    is_trainable: bool = False,
    llm_path: str | None = None,
    vision_path: str | None = None,
):
    """Rebuild the trained model of a bundle (or a merged export). Returns (model, BundleConfig).

    `merge_lora=True` folds the adapter into the weights (a plain QWenVLForCausalLM, fastest for inference);
    `merge_lora=False` returns the PeftModel (`is_trainable=True` to continue training). `llm_path` /
    `vision_path` override the base folders recorded in the bundle (e.g. on another machine).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config = BundleConfig.load(folder)
    recorded_llm, recorded_vision = config.resolve(folder)
    model = build_vlm(
        llm_path or recorded_llm,
        vision_path or recorded_vision,
        vision_feature_layer=config.vision_feature_layer,
        dtype=dtype,
    )
    if model.vision_tower.num_patches != config.num_image_tokens:
        raise ValueError(
            f"{folder}: trained with {config.num_image_tokens} image tokens, but the vision tower at "
            f"{vision_path or recorded_vision} gives {model.vision_tower.num_patches}"
        )
    load_projector(model, folder)
    if config.adapter and not config.merged:
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: the bundle's LoRA adapter is missing ({name})")
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        unwrap(model).projector.requires_grad_(is_trainable)
        if merge_lora:
            model = model.merge_and_unload()
    return model, config


def load_trainable(model, folder: str | os.PathLike) -> None:
    """Put a bundle's trained weights (LoRA adapter and projector) into `model`, a PeftModel (or DDP wrapper)
    built with the same settings: resuming training, or restoring the best checkpoint at its end."""
    folder = Path(folder)
    if hasattr(model, "peft_config"):
        result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: adapter tensors the model does not have: {result.unexpected_keys}")
    load_projector(unwrap(model), folder)


def check_compatible(folder: str | os.PathLike, current: BundleConfig, model) -> None:
    """Refuse a bundle of another model: different base folders, feature layer, image tokens, LoRA shape
    (rank, alpha, targets, trained embeddings), or an adapter where the model has none (the align stage). One
    ValueError naming every difference (FileNotFoundError: no adapter where the model has one)."""
    folder = Path(folder)
    saved = BundleConfig.load(folder)
    problems = [f"{name}: checkpoint {getattr(saved, name)!r} vs now {getattr(current, name)!r}"
                for name in IDENTITY_FIELDS if getattr(saved, name) != getattr(current, name)]
    if not hasattr(model, "peft_config"):
        if (folder / ADAPTER_CONFIG_FILE).is_file():
            problems.append("LoRA adapter: the checkpoint has one, the model now has none (an instruct checkpoint "
                            "cannot resume the align stage)")
    else:
        config_file = folder / ADAPTER_CONFIG_FILE
        if not config_file.is_file() or not (folder / ADAPTER_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no LoRA adapter in it (an align-stage checkpoint cannot resume the "
                                    "instruct stage: start it with model.projector_path instead)")
        saved_adapter = json.loads(config_file.read_text())
        now = model.peft_config["default"].to_dict()
        for name in ADAPTER_FIELDS:
            a, b = saved_adapter.get(name), now.get(name)
            if isinstance(a, (list, set, tuple)) or isinstance(b, (list, set, tuple)):
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                problems.append(f"LoRA {name}: checkpoint {a!r} vs now {b!r}")
    if problems:
        raise ValueError(f"{folder} was trained with different settings: " + "; ".join(problems))
