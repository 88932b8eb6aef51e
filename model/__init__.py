"""The multimodal model: the projector and the splice (`modeling_vlm`), built from any pair of backbones
(`build`), described by one config saved in every bundle (`config`), LoRA, checkpoint bundles, export.

The names load on first use (peft and transformers' models take seconds), so that `python -m model.export
--help` answers before them.
"""

from common.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "Projector": ".modeling_vlm",
    "VLMConfig": ".config",
    "VisionLanguageModel": ".modeling_vlm",
    "apply_lora": ".lora",
    "build_vlm": ".build",
    "load_vlm": ".bundle",
    "save_bundle": ".bundle",
    "unwrap": ".bundle",
    "vlm_config_for": ".build",
})

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
