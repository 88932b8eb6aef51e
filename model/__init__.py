"""The multimodal model: the projector and the splice (`modeling_vlm`), built from any pair of backbones
(`build`), described by one config saved in every bundle (`config`), LoRA, checkpoint bundles, export."""

from .build import build_vlm, vlm_config_for
from .bundle import load_vlm, save_bundle, unwrap
from .config import VLMConfig
from .lora import apply_lora
from .modeling_vlm import Projector, VisionLanguageModel

__all__ = [
    "Projector",
    "VLMConfig",
    "VisionLanguageModel",
    "apply_lora",
    "build_vlm",
    "load_vlm",
    "save_bundle",
    "unwrap",
    "vlm_config_for",
]
