"""The multimodal model: projector and QWen with image features spliced in, LoRA, checkpoint bundles, export."""

from .bundle import BundleConfig, build_vlm, bundle_config_for, load_vlm, save_bundle, unwrap
from .lora import apply_lora
from .modeling_vlm import Projector, QWenVLForCausalLM

__all__ = [
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
