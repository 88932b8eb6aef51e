"""llm: language backbones. The Qwen2 / Qwen2.5 / Qwen3 tokenizer (`qwen2_tokenizer`) and tiny random
checkpoints in the published folder layouts (`tiny`).

The checkpoint writer imports torch (seconds); it loads on first use, so that tokenizer-only users start fast.
"""

from common.lazy import lazy_exports

from .qwen2_tokenizer import Qwen2Tokenizer

__getattr__ = lazy_exports(__name__, {
    "write_tiny_qwen2_checkpoint": ".tiny",
    "write_qwen2_tokenizer_files": ".tiny",
})

__all__ = ["Qwen2Tokenizer", "write_qwen2_tokenizer_files", "write_tiny_qwen2_checkpoint"]
