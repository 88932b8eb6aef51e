"""Write tiny random Qwen2.5 / Qwen3 checkpoints in exactly the published folder layouts.

`write_tiny_qwen2_checkpoint(path, "Qwen/Qwen2.5-7B-Instruct")` writes what that repository holds, with tiny
sizes: `config.json` (every published field, as transformers 4.x wrote it: `torch_dtype`, `rope_theta`,
sliding-window fields, `tie_word_embeddings`, bos/eos ids, the published `vocab_size` of 151936 or 152064,
whose rows past the tokenizer are padding), `generation_config.json`, safetensors weights under the published
key names (`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
as the repository has them; no `lm_head.weight` when the embeddings are tied), `tokenizer.json`,
`tokenizer_config.json` (the `added_tokens_decoder`, the chat template, eos/pad as published), `vocab.json`
and `merges.txt`. The layouts (`PUBLISHED_LAYOUTS`) are Qwen2.5-7B-Instruct (untied, 152064 rows),
Qwen2.5-1.5B-Instruct (tied), Qwen3-8B (untied) and Qwen3-1.7B (tied); the fields are written from the
published files as remembered, not downloaded (nothing here reaches a model hub).

The tokenizer. By Qwen's account Qwen2.5's byte-level BPE is the 151,643 ranks of Qwen-7B's `qwen.tiktoken`,
then added tokens from id 151643; `tokenizer.json` is built from a `qwen.tiktoken` file by
`qwen.fast_tokenizer.build_fast_tokenizer` with the added tokens below: the real file when one is given
(`vocab_file=`), else the tiny demo vocabulary (`qwen.tiny_vocab`), whose added tokens keep their real ids.

The weights come from our own seeded generator (matrices N(0, 0.02), biases N(0, bias_std), norm weights
1 + N(0, norm_std)), not from transformers' classes, so loading them with transformers checks the key names
and shapes against a file its own code did not write.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken

from common.fileio import staged_folder, write_json, write_text
from qwen.checkpoint import save_sharded_safetensors
from qwen.fast_tokenizer import build_fast_tokenizer
from qwen.tiny_vocab import write_tiny_vocab
from qwen.tokenization_qwen import ENDOFTEXT, IM_END

from .qwen2_tokenizer import TOKENIZER_FILE

# Added tokens of the published tokenizer.json files, in id order from 151643, with their "special" flag.
# The flags are those of Qwen2.5's published tokenizer_config.json: the fourteen <|...|> tokens up to
# <|video_pad|> are special; the tool-call and fill-in-the-middle tokens are not (checked against a copy of
# the published file; Qwen3's four additions are not special either, as remembered).
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),         # 151643
    ("<|im_start|>", True),          # 151644
    ("<|im_end|>", True),            # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),    # 151647
    ("<|box_start|>", True),         # 151648
    ("<|box_end|>", True),           # 151649
    ("<|quad_start|>", True),        # 151650
    ("<|quad_end|>", True),          # 151651
    ("<|vision_start|>", True),      # 151652
    ("<|vision_end|>", True),        # 151653
    ("<|vision_pad|>", True),        # 151654
    ("<|image_pad|>", True),         # 151655
    ("<|video_pad|>", True),         # 151656
    ("<tool_call>", False),          # 151657
    ("</tool_call>", False),         # 151658
    ("<|fim_prefix|>", False),       # 151659
    ("<|fim_middle|>", False),       # 151660
    ("<|fim_suffix|>", False),       # 151661
    ("<|fim_pad|>", False),          # 151662
    ("<|repo_name|>", False),        # 151663
    ("<|file_sep|>", False),         # 151664
)
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *QWEN2_5_ADDED_TOKENS,
    ("<tool_response>", False),      # 151665
    ("</tool_response>", False),     # 151666
    ("<think>", False),              # 151667
    ("</think>", False),             # 151668
)
# tokenizer_config.json's additional_special_tokens: the special added tokens after <|endoftext|>
ADDITIONAL_SPECIAL_TOKENS = [content for content, special in QWEN2_5_ADDED_TOKENS[1:] if special]

QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The "# Tools" block both templates put at the end of the system message when tools are given.
_TOOLS_BLOCK = (
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
)
# A run of tool messages becomes one user turn of <tool_response> blocks.
_TOOL_MESSAGE = (
    "{%- if i == 0 or turns[i - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if i == turns | length - 1 or turns[i + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)
# An assistant turn's tool calls, each on its own lines after the content.
_TOOL_CALLS = (
    "{%- for call in message.tool_calls %}"
    "{%- set call = call.function if call.function is defined else call %}"
    "{%- if not loop.first or content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{{- call.arguments if call.arguments is string else call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
)

QWEN2_5_CHAT_TEMPLATE = (
    # First the system turn, always: the first message if it is a system message, else the default system
    # prompt, followed by the tools block when tools are given.
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}"
    f"{{%- set system = '{QWEN2_5_DEFAULT_SYSTEM}' %}}{{%- set turns = messages %}}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\n\\n' }}" + _TOOLS_BLOCK + "{%- else %}{{- '<|im_end|>\\n' }}{%- endif %}"
    # Then every other message as <|im_start|>{role}\n{content}<|im_end|>\n.
    "{%- for message in turns %}{%- set i = loop.index0 %}"
    "{%- if message.role == 'tool' %}" + _TOOL_MESSAGE +
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{%- set content = message.content or '' %}"
    "{{- '<|im_start|>assistant' }}{%- if content %}{{- '\\n' + content }}{%- endif %}"
    + _TOOL_CALLS +
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-Instruct's chat template, written here to render what the published one renders:

    <|im_start|>system\\n{system}<|im_end|>\\n            (the first message if it is a system message, else
                                                        "You are Qwen, created by Alibaba Cloud. You are a
                                                        helpful assistant.")
    <|im_start|>{role}\\n{content}<|im_end|>\\n           (every other message, system ones included)
    <|im_start|>assistant\\n                             (add_generation_prompt)

With `tools`, the system turn ends with "\\n\\n# Tools ..." listing each tool as JSON; an assistant message's
`tool_calls` follow its content as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` lines; a
run of `tool` messages is one user turn of `\\n<tool_response>\\n{content}\\n</tool_response>` blocks.
"""

QWEN3_CHAT_TEMPLATE = (
    # The system turn only when there is a system message or tools (Qwen3 has no default system prompt).
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}{%- if system is not none %}{{- system + '\\n\\n' }}{%- endif %}"
    + _TOOLS_BLOCK +
    "{%- elif system is not none %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    # The last real user query (not a tool response wrapped in a user message; with none, the last message):
    # assistant turns after it keep their reasoning, earlier ones lose it.
    "{%- set ns = namespace(last_query=turns | length - 1) %}"
    "{%- for message in turns %}"
    "{%- if message.role == 'user' and not (message.content is string and message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in turns %}{%- set i = loop.index0 %}"
    "{%- if message.role == 'tool' %}" + _TOOL_MESSAGE +
    "{%- elif message.role == 'assistant' %}"
    # Reasoning: `reasoning_content`, else what the content holds between <think> and </think>.
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if i > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}" + _TOOL_CALLS + "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat template (the hybrid-thinking models, e.g. Qwen3-8B), written here to render what the published
one renders:

    <|im_start|>system\\n{system}<|im_end|>\\n       (only when the first message is a system message)
    <|im_start|>{role}\\n{content}<|im_end|>\\n      (user messages, later system messages)
    <|im_start|>assistant\\n{content}<|im_end|>\\n   (assistant turns before the last user query: reasoning
                                                   between <think> and </think> is dropped)
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}<|im_end|>\\n
                                                  (assistant turns after it, when they have reasoning, and the
                                                   last message if it is an assistant one)
    <|im_start|>assistant\\n                        (add_generation_prompt; followed by <think>\\n\\n</think>\\n\\n
                                                   when enable_thinking=False is passed)

Tools, tool calls and tool responses as in Qwen2.5's template; without a system message the tools block opens
the system turn on its own.
"""


@dataclass(frozen=True)
class PublishedLayout:
    """What one published repository holds, apart from sizes: config.json, generation_config.json, the
    tokenizer family and the number of weight files."""

    repo: str
    family: str  # "qwen2.5" or "qwen3": the added tokens and the chat template
    config: dict[str, Any]
    generation_config: dict[str, Any]
    num_shards: int


_QWEN2_5_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
}
_QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
}
_QWEN2_5_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}
_QWEN3_GENERATION = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}

PUBLISHED_LAYOUTS: dict[str, PublishedLayout] = {layout.repo: layout for layout in (
    PublishedLayout("Qwen/Qwen2.5-7B-Instruct", "qwen2.5",
                    {**_QWEN2_5_CONFIG, "sliding_window": 131072, "tie_word_embeddings": False, "vocab_size": 152064},
                    _QWEN2_5_GENERATION, num_shards=4),
    PublishedLayout("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5",
                    {**_QWEN2_5_CONFIG, "sliding_window": 32768, "tie_word_embeddings": True, "vocab_size": 151936},
                    {**_QWEN2_5_GENERATION, "repetition_penalty": 1.1}, num_shards=1),
    PublishedLayout("Qwen/Qwen3-8B", "qwen3", {**_QWEN3_CONFIG, "tie_word_embeddings": False, "vocab_size": 151936},
                    _QWEN3_GENERATION, num_shards=5),
    PublishedLayout("Qwen/Qwen3-1.7B", "qwen3", {**_QWEN3_CONFIG, "tie_word_embeddings": True, "vocab_size": 151936},
                    _QWEN3_GENERATION, num_shards=2),
)}

# Tiny sizes (GQA: fewer key/value heads than query heads). Qwen3's head_dim is its own field; here, as in
# Qwen3-0.6B/1.7B, heads * head_dim differs from hidden_size.
TINY_SIZES = {
    "qwen2.5": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2},
    "qwen3": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16},
}


def published_layout(repo: str) -> PublishedLayout:
    """The layout of `repo` ("Qwen/Qwen2.5-7B-Instruct", ...); ValueError naming the known ones otherwise."""
    try:
        return PUBLISHED_LAYOUTS[repo]
    except KeyError:
        raise ValueError(f"no tiny layout for {repo!r}; known: {', '.join(PUBLISHED_LAYOUTS)}") from None


def tiny_qwen2_config(repo: str = "Qwen/Qwen2.5-7B-Instruct", **overrides: Any) -> dict[str, Any]:
    """config.json content of `repo` with tiny sizes (max_window_layers = num_hidden_layers, as in the
    7B/8B files). `overrides` are config.json fields of that repository; an unknown one is a ValueError."""
    layout = published_layout(repo)
    config = {**layout.config, **TINY_SIZES[layout.family]}
    config["max_window_layers"] = config["num_hidden_layers"]
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config.json fields for {repo}: {sorted(unknown)}")
    config.update(overrides)
    return dict(sorted(config.items()))  # the published files list their fields alphabetically


def random_qwen2_state_dict(config: dict[str, Any], *, seed: int = 0, bias_std: float = 0.02,
                            norm_std: float = 0.1) -> dict[str, torch.Tensor]:
    """Published key names and shapes for a Qwen2 (q/k/v biases) or Qwen3 (q/k norms, head_dim) config, in the
    order transformers lists them. No `lm_head.weight` when the embeddings are tied."""
    g = torch.Generator().manual_seed(seed)
    h, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    qwen3 = config["model_type"] == "qwen3"
    std = config["initializer_range"]

    def normal(*shape: int, s: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    def norm(size: int) -> torch.Tensor:
        return 1 + normal(size, s=norm_std)

    sd = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        projections = (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim))
        for name, rows in projections:
            sd[p + f"self_attn.{name}.weight"] = normal(rows, h)
            if not qwen3:  # Qwen2 has biases on q/k/v; Qwen3 has none (attention_bias false)
                sd[p + f"self_attn.{name}.bias"] = normal(rows, s=bias_std)
        sd[p + "self_attn.o_proj.weight"] = normal(h, heads * head_dim)
        if qwen3:  # RMSNorm over each head's query and key, before rotary
            sd[p + "self_attn.q_norm.weight"] = norm(head_dim)
            sd[p + "self_attn.k_norm.weight"] = norm(head_dim)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "mlp.gate_proj.weight"] = normal(ff, h)
        sd[p + "mlp.up_proj.weight"] = normal(ff, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, ff)
    sd["model.norm.weight"] = norm(h)
    if not config["tie_word_embeddings"]:
        sd["lm_head.weight"] = normal(vocab, h)
    return sd


def added_tokens(family: str) -> list[AddedToken]:
    """The added tokens of a family's tokenizer.json, in id order from 151643 (not normalised, as published)."""
    table = {"qwen2.5": QWEN2_5_ADDED_TOKENS, "qwen3": QWEN3_ADDED_TOKENS}[family]
    return [AddedToken(content, special=special, normalized=False) for content, special in table]


def tokenizer_config(family: str, model_max_length: int = 131072) -> dict[str, Any]:
    """tokenizer_config.json as published for Qwen2.5-Instruct / Qwen3: eos `<|im_end|>`, pad `<|endoftext|>`,
    no bos/unk, the added tokens by id, the chat template."""
    decoder = {
        str(151643 + i): {"content": token.content, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": token.special}
        for i, token in enumerate(added_tokens(family))
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": None,
        "chat_template": {"qwen2.5": QWEN2_5_CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE}[family],
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen2_tokenizer_files(folder: str | os.PathLike, family: str = "qwen2.5", *,
                                vocab_file: str | os.PathLike | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json and merges.txt of `family` into `folder`.

    The BPE is `vocab_file` (a qwen.tiktoken file: the real one gives the published 151,643 ranks) or, by
    default, the tiny demo vocabulary. vocab.json and merges.txt are tokenizer.json's BPE model written out
    (with a tiny vocabulary the model also lists the added tokens at their ids, as tokenizer.json does).
    """
    folder = Path(folder)
    if family not in TINY_SIZES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(TINY_SIZES)}")
    with tempfile.TemporaryDirectory() as scratch:
        if vocab_file is None:
            vocab_file = write_tiny_vocab(Path(scratch) / "qwen.tiktoken")
        tokenizer = build_fast_tokenizer(vocab_file, added_tokens(family), ignore_merges=False)
    text = tokenizer.to_str(pretty=True)
    model = json.loads(text)["model"]
    write_text(folder / TOKENIZER_FILE, text)
    write_json(folder / "tokenizer_config.json", tokenizer_config(family))
    write_text(folder / "vocab.json", json.dumps(model["vocab"], ensure_ascii=False, separators=(",", ":")))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in model["merges"]))


def write_tiny_qwen2_checkpoint(
    path: str | os.PathLike,
    repo: str = "Qwen/Qwen2.5-7B-Instruct",
    *,
    seed: int = 0,
    num_shards: int | None = None,
    bias_std: float = 0.02,
    norm_std: float = 0.1,
    dtype: torch.dtype = torch.float32,
    vocab_file: str | os.PathLike | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **config_fields: Any,
) -> Path:
    """Write a complete tiny checkpoint folder of `repo`'s layout at `path` (atomically: built aside, renamed).

    `config_fields` are config.json fields (hidden_size, tie_word_embeddings, ...); `num_shards` defaults to the
    repository's own count of weight files; config.json's `torch_dtype` names `dtype`, the dtype written.
    `state_dict` replaces the random weights; `vocab_file` is a qwen.tiktoken file for the tokenizer (default:
    the tiny demo vocabulary). Returns the folder.
    """
    path = Path(path)
    layout = published_layout(repo)
    config = tiny_qwen2_config(repo, **config_fields)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if state_dict is None:
        state_dict = random_qwen2_state_dict(config, seed=seed, bias_std=bias_std, norm_std=norm_std)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    with staged_folder(path) as staging:
        write_json(staging / "config.json", config)
        write_json(staging / "generation_config.json", layout.generation_config)
        save_sharded_safetensors(state_dict, staging, num_shards=num_shards or layout.num_shards)
        write_qwen2_tokenizer_files(staging, layout.family, vocab_file=vocab_file)
    return path
