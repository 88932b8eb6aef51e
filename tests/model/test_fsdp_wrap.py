import json
from pathlib import Path

import pytest

from model import apply_lora, build_vlm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("llm, layer", [("tiny_llm_dir", "QWenBlock"), ("tiny_qwen2_dir", "Qwen2DecoderLayer")])
def test_fsdp_wraps_each_decoder_layer_of_the_llm(request, tiny_clip_dir, llm, layer):
    """configs/fsdp.json names no class: accelerate then wraps the model's `_no_split_modules`, which must be the
    LLM's decoder layers whatever the family (a QWen v1 class name would find nothing in Qwen2.5)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert "transformer_layer_cls_to_wrap" not in json.loads((ROOT / "configs" / "fsdp.json").read_text())
    model = apply_lora(build_vlm(request.getfixturevalue(llm), tiny_clip_dir), r=4, alpha=8, verbose=False)
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)]
    layers = [name for name, module in model.named_modules() if type(module).__name__ == layer]
    assert plugin.transformer_cls_names_to_wrap == [layer]
    assert wrapped == layers and len(layers) == 2
