"""What the project needs to know about a family of language backbones: one `TextFamily` per family file.

A family says which `config.json` model types it loads, how to load the causal LM strictly and its tokenizer
from a published folder, which modules LoRA targets by default, and which modules are the input embeddings
and the output head. Everything else (the splice, the loss, generation, LoRA, checkpoints) is shared and works
through the transformers interface every causal LM has: `get_input_embeddings()`, `get_decoder()` (the stack
that turns `inputs_embeds` into hidden states), `get_output_embeddings()` (the LM head), `generate()`.

Every family's tokenizer has the same chat-tokenizer interface (`ChatTokenizer`): the data pipeline, generation
and the exports use only these members.

A family also says how its merged causal LM is written as a model transformers has (`TransformersText`: the
config, the tensors under that model's names, the fast tokenizer): the text half of `model.export --format llava`.
QWen v1 is converted to Qwen2 tensor by tensor; Qwen2 / Qwen3 go out as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class ChatTokenizer(Protocol):
    """The members of a tokenizer that the project uses (QWen v1's `QWenTokenizer`, Qwen2/3's `Qwen2Tokenizer`)."""

    im_start_id: int  # <|im_start|>
    im_end_id: int  # <|im_end|>: ends every message, the answer's last supervised token
    eod_id: int  # <|endoftext|>
    pad_token_id: int  # padding (the collator builds attention masks from lengths, never from ids)
    image_token: str  # the reserved token an image expands to (never produced by encode_text)
    image_token_id: int
    special_ids: frozenset[int]  # ids encode_text never gives
    stop_token_ids: list[int]  # <|im_end|>, <|im_start|>, <|endoftext|>

    def encode_text(self, text: str) -> list[int]: ...  # special-token look-alikes stay ordinary text
    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str: ...
    def answer_token_ids(self) -> list[int]: ...  # the ids an answer may hold: ordinary tokens and stop ids


@dataclass(frozen=True)
class TransformersText:
    """A merged causal LM as one of transformers' own causal LMs (what LLaVA's `text_config` names), in memory;
    model/export_llava.py writes it."""

    config: Any  # transformers' config of that model (Qwen2Config, Qwen3Config); its model_type picks the class
    tensors: dict[str, torch.Tensor]  # that class's names: model.*, lm_head.weight (absent when tied)
    tokenizer_json: str  # the fast tokenizer (tokenizer.json) with the LLM's ids
    converted_from: str = ""  # the original architecture when the tensors were converted ("QWen v1"), else ""
    renamed: str = ""  # how the original module names map to the exported ones ("c_attn -> q/k/v_proj, ..."), else ""
    limits: tuple[str, ...] = ()  # where the exported model computes something else than the original (one line each)


@dataclass(frozen=True)
class TextFamily:
    """One family of language backbones (see the module docstring)."""

    name: str  # recorded in checkpoint bundles: "qwen" (QWen v1), "qwen2" (Qwen2 / Qwen2.5 / Qwen3)
    model_types: tuple[str, ...]  # the config.json model_type values this family loads
    lora_targets: tuple[str, ...]  # default LoRA targets, matched as suffixes of module names in the layers
    layers: str  # module path of the decoder layers inside the causal LM ("transformer.h", "model.layers")
    embedding_modules: tuple[str, ...]  # input embeddings and LM head: trained whole with lora.train_embeddings
    # (folder, dtype, quantization="none" | "nf4") -> the causal LM, every tensor checked; nf4: 4-bit linear weights
    # through llm.quantization.from_pretrained_kwargs, the one way every family quantises
    load_model: Callable[..., torch.nn.Module]
    load_tokenizer: Callable[[str | os.PathLike], ChatTokenizer]
    # (merged causal LM, its base folder) -> the same model as transformers' own causal LM
    to_transformers: Callable[[torch.nn.Module, Path], TransformersText]


def read_model_type(folder: str | os.PathLike, what: str) -> tuple[str, dict]:
    """`model_type` and the whole config.json of a model folder; FileNotFoundError / ValueError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder} (models load from local folders only)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"{path} has no model_type: cannot tell which {what} it is")
    return raw["model_type"], raw
