"""The multimodal model: projector, QWen with image features spliced in, LoRA, checkpoint bundles."""

from .bundle import BundleConfig, build_vlm, bundle_config_for, load_vlm, save_bundle, unwrap
from .lora import DEFAULT_LORA_TARGETS, apply_lora
from .modeling_vlm import IMAGE_TOKEN_ID, QWenVLForCausalLM
from .projector import Projector

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "IMAGE_TOKEN_ID",
    "BundleConfig",
    "Projector",
    "QWenVLForCausalLM",
    "apply_lora",
    "build_vlm",
    "bundle_config_for",
    "load_vlm",
    "save_bundle",
    "unwrap",
]
