"""Save and load a trained checkpoint bundle, whatever its backbones.

A bundle is one self-describing folder:

    vlm_config.json            the model description (model/config.py): backbones, feature layer, image token
    projector.safetensors      the trained projector
    adapter_config.json        the LoRA adapter of the language model, in PEFT's own format:
    adapter_model.safetensors  `peft.PeftModel.from_pretrained(llm, folder)` works on the plain base LLM

`load_vlm(folder)` rebuilds exactly the trained model (a QLoRA bundle's base in 4-bit again, its adapter kept
beside the 4-bit weights). A merged export (`python -m model.export`) has the same `vlm_config.json` and
projector, and the LLM's weights with the LoRA folded in instead of an adapter; it loads without peft.
Everything that knows the bundle's files is here: saving, loading for inference,
restoring the trainable weights when training resumes, and refusing a bundle of another model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from common.fileio import staged_files
from common.safetensors_file import save_safetensors
from llm.quantization import NONE, check_quantization

from .build import build_vlm
from .config import BUNDLE_CONFIG_FILE, VLMConfig, differences
from .modeling_vlm import VisionLanguageModel

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "modules_to_save")
_MODULE_LISTS = ("target_modules", "modules_to_save")


def adapter_identity(adapter_config: dict) -> dict:
    """The ADAPTER_FIELDS of a PEFT adapter config as `check_compatible` compares them, keyed "LoRA <field>": the
    module lists sorted (their order does not matter; none is an empty list)."""
    identity = {}
    for name in ADAPTER_FIELDS:
        value = adapter_config.get(name)
        if name in _MODULE_LISTS and not isinstance(value, str):  # (a str target_modules is a regular expression)
            value = sorted(value or [])
        identity[f"LoRA {name}"] = value
    return identity


def unwrap(model) -> VisionLanguageModel:
    """The VisionLanguageModel inside a DDP (or other) wrapper, or the model itself."""
    while not isinstance(model, VisionLanguageModel):
        if hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"not a VisionLanguageModel (or a wrapper of one): {type(model).__name__}")
    return model


def save_bundle(model, folder: str | os.PathLike, config: VLMConfig, state_dict: dict | None = None) -> Path:
    """Write the language model's LoRA adapter (when it has one), the projector and the config into `folder`.

    Files are written aside first and moved in one by one, the config last: an interrupted save leaves no
    half-written file, and a folder without vlm_config.json is recognisably incomplete. Other files already
    in `folder` (the Trainer's optimizer state, say) are left alone. `state_dict`: whole tensors named as in the
    VisionLanguageModel's own `state_dict()` (`language_model.…`, `projector.…`), at least the trained ones, for a
    model whose own parameters are shards (DeepSpeed ZeRO-3, FSDP); the adapter and the projector are then taken
    from it (ValueError if it lacks any of theirs).
    """
    folder = Path(folder)
    vlm = unwrap(model)
    if state_dict is None:
        adapter, projector = None, vlm.projector.state_dict()
    else:
        trained = [name for name, p in vlm.language_model.named_parameters(remove_duplicate=False)
                   if p.requires_grad]  # (a trained copy of tied embeddings: peft saves it under both names)
        adapter = _part_of(vlm, vlm.language_model, state_dict, needed=trained) if vlm.has_adapter else None
        projector = _part_of(vlm, vlm.projector, state_dict, needed=list(vlm.projector.state_dict()))
    (folder / BUNDLE_CONFIG_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new config lands
    with staged_files(folder, last=(BUNDLE_CONFIG_FILE,)) as staging:
        if vlm.has_adapter:  # (peft keeps the adapter's tensors of `adapter`, named relative to the language model)
            vlm.language_model.save_pretrained(staging, safe_serialization=True, state_dict=adapter)
        save_safetensors({k: v.detach().float().contiguous() for k, v in projector.items()}, staging / PROJECTOR_FILE)
        dataclasses.replace(config, adapter=vlm.has_adapter).save(staging)
    return folder


def _part_of(vlm: VisionLanguageModel, module: torch.nn.Module, state_dict: dict, needed: list[str]) -> dict:
    """The tensors of `state_dict` (named as in `vlm.state_dict()`) that belong to `module`, one of `vlm`'s
    submodules, named relative to it; ValueError naming those of `needed` it lacks."""
    prefix = next(name for name, sub in vlm.named_modules() if sub is module) + "."
    part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if missing := sorted(set(needed) - set(part)):
        raise ValueError(f"save_bundle: the state_dict lacks tensors of {prefix[:-1]}: {missing}")
    return part


def load_projector(model: VisionLanguageModel, folder: Path) -> None:
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
    tokenizer=None,
    quantization: str | None = None,
) -> tuple[VisionLanguageModel, VLMConfig]:
    """Rebuild the trained model of a bundle (or a merged export). Returns (model, VLMConfig).

    `merge_lora=True` folds the adapter into the language model's weights (fastest for inference);
    `merge_lora=False` keeps it a peft model (`is_trainable=True` to continue training). `llm_path` /
    `vision_path` override the base folders recorded in the bundle (e.g. on another machine); the backbones
    found there must be of the recorded families and shapes. `quantization` ("none" / "nf4") overrides the
    bundle's `text.quantization`: by default a QLoRA bundle's base loads in 4-bit again, and its adapter stays
    beside the 4-bit weights whatever `merge_lora` says (folding it in would round it to 4 bits: another model
    than the trained one); "none" loads the original weights and merges as asked (what model.export does).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config = VLMConfig.load(folder)
    quantization = config.text.quantization if quantization is None else check_quantization(quantization,
                                                                                            "quantization")
    recorded_llm, recorded_vision = config.resolve(folder)
    model = build_vlm(llm_path or recorded_llm, vision_path or recorded_vision,
                      vision_feature_layer=config.vision.feature_layer, dtype=dtype, tokenizer=tokenizer,
                      quantization=quantization)
    found = {"text.family": model.text_family.name, "text.hidden_size": model.config.hidden_size,
             "vision.family": model.vision_tower.family, "vision.hidden_size": model.vision_tower.hidden_size,
             "vision.num_image_tokens": model.vision_tower.num_patches, "image_token_id": model.image_token_id}
    if problems := differences(config.projector_input(), found):
        raise ValueError(f"{folder} does not fit the base models at {llm_path or recorded_llm} and "
                         f"{vision_path or recorded_vision}: " + "; ".join(problems))
    load_projector(model, folder)
    if config.adapter and not config.merged:
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: the bundle's LoRA adapter is missing ({name})")
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model.language_model = PeftModel.from_pretrained(model.language_model, str(folder),
                                                             is_trainable=is_trainable)
        model.projector.requires_grad_(is_trainable)
        if merge_lora and quantization == NONE:
            model.merge_adapter()
    return model, config


def load_trainable(model, folder: str | os.PathLike) -> None:
    """Put a bundle's trained weights (LoRA adapter and projector) into `model` (or its DDP wrapper), built with
    the same settings: resuming training, or restoring the best checkpoint at its end."""
    folder = Path(folder)
    vlm = unwrap(model)
    if vlm.has_adapter:
        result = set_peft_model_state_dict(vlm.language_model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: adapter tensors the model does not have: {result.unexpected_keys}")
    load_projector(vlm, folder)


def check_compatible(folder: str | os.PathLike, current: VLMConfig, model) -> None:
    """Refuse a bundle of another model: different backbones or base folders, feature layer, image tokens, LoRA
    shape (rank, alpha, targets, trained embeddings), or an adapter where the model has none (the align stage).
    One ValueError naming every difference (FileNotFoundError: no adapter where the model has one)."""
    folder = Path(folder)
    problems = differences(VLMConfig.load(folder).identity(), current.identity())
    vlm = unwrap(model)
    if not vlm.has_adapter:
        if (folder / ADAPTER_CONFIG_FILE).is_file():
            problems.append("LoRA adapter: the checkpoint has one, the model now has none (an instruct checkpoint "
                            "cannot resume the align stage)")
    else:
        config_file = folder / ADAPTER_CONFIG_FILE
        if not config_file.is_file() or not (folder / ADAPTER_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no LoRA adapter in it (an align-stage checkpoint cannot resume the "
                                    "instruct stage: start it with model.projector_path instead)")
        saved_adapter = json.loads(config_file.read_text())
        now = vlm.language_model.peft_config["default"].to_dict()
        problems += differences(adapter_identity(saved_adapter), adapter_identity(now))
    if problems:
        raise ValueError(f"{folder} was trained with different settings: " + "; ".join(problems))
