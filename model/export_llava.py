"""The folder of a transformers-native LLaVA: `LlavaForConditionalGeneration` with the bundle's two backbones.

    python -m model.export --checkpoint outputs/demo --output exported-llava/ --format llava [--dtype bf16]

model/export.py checks the output folder, merges the LoRA (in fp32) and stages the folder; `write_llava` here
writes its contents, for any pair of backbones. The language model's family says how its merged weights read as
one of transformers' causal LMs (`TextFamily.to_transformers`, llm/): QWen v1 is converted to Qwen2 tensor by
tensor (llm/qwen1.py), Qwen2 / Qwen2.5 / Qwen3 go out as they are. The vision tower's class says which vision
model computes its features (`feature_model_config`) and which rows LLaVA keeps (`feature_select_strategy`).

The folder loads with stock transformers (`AutoModelForImageTextToText.from_pretrained(DIR)`,
`AutoProcessor.from_pretrained(DIR)`, no trust_remote_code) and serves with `vllm serve DIR`:

    config.json                      LlavaConfig: the vision config (CLIP; SigLIP without its pooling head),
                                     vision_feature_layer, select strategy ("default": CLS dropped, CLIP; "full":
                                     every patch, SigLIP), image_token_index (the LLM's image token: <|extra_0|>
                                     151646 for QWen v1, <|image_pad|> 151655 for Qwen2.5 / Qwen3), text config
                                     (Qwen2 for QWen v1, else the LLM's own)
    model*.safetensors (+ index)     llava-hf's tensor names: language_model.model.*, language_model.lm_head (absent
                                     when tied), multi_modal_projector.linear_1/linear_2, vision_tower.vision_model.*
    tokenizer.json                   the LLM's ids: rebuilt from qwen.tiktoken (QWen v1), the LLM folder's own (Qwen2/3)
    tokenizer_config.json            eos <|im_end|>, pad <|endoftext|>, no bos, left padding
    chat_template.jinja              our ChatML prompt with the trained system prompt (model/llava_chat_template.py)
    preprocessor_config.json         the tower's image processor, with the settings our preprocessing uses
    processor_config.json            LlavaProcessor: image token, patch size, strategy, additional tokens (CLS: 1)
    generation_config.json           infer.py's defaults: greedy, stops at <|im_end|>, <|im_start|>, <|endoftext|>,
                                     suppresses the special tokens an answer may not hold (suppressed_token_ids)
    README.md                        model card (model/model_card.py)
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from transformers import LlavaConfig

from common.fileio import write_json, write_text
from llm import ChatTokenizer
from qwen.checkpoint import save_sharded_safetensors
from visual.checkpoint import CHECKPOINT_PREFIX, expected_vision_tensors, read_vision_tensors
from visual.images import ImagePreprocessor
from visual.towers import num_image_tokens, vision_tower_class

from .config import VLMConfig
from .llava_chat_template import chat_template
from .model_card import model_card


def vision_tower_tensors(vision_path: str | os.PathLike):
    """(tower class, vision config, tensors under llava-hf names) of the vision folder: the tower family's whole
    vision model (every layer: LLaVA picks the feature layer from its hidden_states; no text tower, and nothing the
    features never use, such as SigLIP's pooling head). The folder is checked first (its tensors and its image
    processor: the tower class's `inspect_checkpoint`)."""
    tower = vision_tower_class(vision_path)
    config, files, found = tower.inspect_checkpoint(vision_path)
    config = tower.feature_model_config(config)
    used = expected_vision_tensors(tower.model_class, config)
    wanted = {name: f"vision_tower.{CHECKPOINT_PREFIX}{name}" for name in found if name in used}
    return tower, config, read_vision_tensors(files, found, wanted)


def projector_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"multi_modal_projector.{name}": state[name]
            for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}


def image_processor_config(preprocessor: ImagePreprocessor) -> dict:
    """transformers' image processor settings (CLIPImageProcessor or SiglipImageProcessor) that do what
    `preprocessor` does (tested pixel for pixel), read by LlavaProcessor."""
    settings = preprocessor.to_transformers_config()
    return {"image_processor_type": settings.pop("image_processor_type"), "processor_class": "LlavaProcessor",
            **settings}


def num_additional_image_tokens(select_strategy: str) -> int:
    """Rows the vision model gives beyond the patch grid, as LlavaProcessor counts them: CLIP's CLS, which the
    "default" strategy drops again (1); none with "full" (SigLIP has no CLS)."""
    return 1 if select_strategy == "default" else 0


def suppressed_token_ids(tokenizer: ChatTokenizer, vocab_size: int) -> list[int]:
    """The ids from the tokenizer's first special token on that an answer may not hold: its special and added
    tokens other than the three stop tokens (the image placeholder among them; QWen v1's `<|extra_N|>`, Qwen2.5's
    vision, tool-call and fill-in-the-middle tokens, Qwen3's `<think>` too) and the embedding rows past the
    tokenizer. With a published vocabulary (151,643 ordinary tokens) these are all the ids our generation never
    produces: 290 of 151,936 rows for Qwen-7B, Qwen2.5-1.5B and Qwen3; 418 of 152,064 for Qwen2.5-7B.

    Not listed (`unlisted_token_ids`): the ids below the first special that the tokenizer has no token for, which
    only a tokenizer smaller than the embedding has (the demo's and the tests' tiny BPE: 150,619 ids, a 1.7 MB
    list). No text contains them, so training only ever lowered their scores, and a trained model does not rank
    them first (measured on the demo: the same greedy answers with and without them); an untrained one may, and
    infer.py masks them all the same."""
    return _never_produced(tokenizer, vocab_size)[0]


def unlisted_token_ids(tokenizer: ChatTokenizer, vocab_size: int) -> list[int]:
    """The ids our generation never produces that `suppressed_token_ids` leaves out (see there)."""
    return _never_produced(tokenizer, vocab_size)[1]


def _never_produced(tokenizer: ChatTokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """The ids our generation never produces, split at the tokenizer's first special id: (from it on, below it)."""
    first, allowed = min(*tokenizer.special_ids, vocab_size), set(tokenizer.answer_token_ids())
    never = [i for i in range(vocab_size) if i not in allowed]
    return [i for i in never if i >= first], [i for i in never if i < first]


def generation_config(tokenizer: ChatTokenizer, vocab_size: int) -> dict:
    """What `inference.generate_answers` does by default (infer.py without --temperature): greedy, no repetition
    penalty, at most 512 new tokens, our stop ids, and `suppressed_token_ids` suppressed (transformers applies
    them; vLLM ignores suppress_tokens)."""
    return {
        "eos_token_id": tokenizer.stop_token_ids,  # <|im_end|>, <|im_start|>, <|endoftext|>
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,
        "repetition_penalty": 1.0,
        "max_new_tokens": 512,
        "suppress_tokens": suppressed_token_ids(tokenizer, vocab_size),
    }


def tokenizer_config(tokenizer: ChatTokenizer, model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, in transformers 4 and 5
        "processor_class": "LlavaProcessor",
        "bos_token": None,
        "eos_token": tokenizer.decode([tokenizer.im_end_id]),  # the end of an answer
        "pad_token": tokenizer.decode([tokenizer.pad_token_id]),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,  # the chat template's markers must become control tokens
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation
    }


def llava_config(text_config, vision_config, *, image_token_id: int, select_strategy: str,
                 vision_feature_layer: int, dtype: torch.dtype) -> LlavaConfig:
    """LlavaConfig of the two backbones' transformers configs. The sub-configs name no folder and no dtype of their
    own (the folder's dtype is the LlavaConfig's)."""
    text_config, vision_config = _portable(text_config), _portable(vision_config)
    return LlavaConfig(
        architectures=["LlavaForConditionalGeneration"],
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens(vision_config),
        projector_hidden_act="gelu",  # model.modeling_vlm.Projector: nn.GELU(), the exact (erf) form
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
        dtype=str(dtype).removeprefix("torch."),
    )


def _portable(config):
    config = copy.deepcopy(config)
    config._name_or_path = ""  # the base folder on the training machine
    config.dtype = None
    return config


def write_processing_files(folder: Path, *, tokenizer: ChatTokenizer, tokenizer_json: str, system_prompt: str,
                           preprocessor: ImagePreprocessor, patch_size: int, select_strategy: str,
                           model_max_length: int, vocab_size: int) -> None:
    """Everything but the weights and config.json: tokenizer, chat template, processor and generation configs."""
    write_text(folder / "tokenizer.json", tokenizer_json)
    write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, model_max_length))
    write_text(folder / "chat_template.jinja", chat_template(system_prompt, tokenizer))
    write_json(folder / "preprocessor_config.json", image_processor_config(preprocessor))
    write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "image_token": tokenizer.image_token,
        "patch_size": patch_size,
        "vision_feature_select_strategy": select_strategy,
        "num_additional_image_tokens": num_additional_image_tokens(select_strategy),
    })
    write_json(folder / "generation_config.json", generation_config(tokenizer, vocab_size))


def write_llava(folder: Path, model, bundle: VLMConfig, *, checkpoint: Path, llm_path: Path, vision_path: Path,
                dtype: torch.dtype, max_shard_bytes: int, name: str) -> None:
    """Write the LLaVA folder of `model` (a VisionLanguageModel with its LoRA merged) into the empty `folder`.
    ValueError for a model or bundle the LLaVA layout cannot express, before anything is written."""
    tokenizer = model.text_family.load_tokenizer(llm_path)
    if (bundle.image_token, bundle.image_token_id) != (tokenizer.image_token, tokenizer.image_token_id):
        raise ValueError(f"the bundle's image token {bundle.image_token} ({bundle.image_token_id}) is not the image "
                         f"token of {llm_path}'s tokenizer, {tokenizer.image_token} ({tokenizer.image_token_id})")
    tower, vision_config, vision_tensors = vision_tower_tensors(vision_path)
    strategy = tower.feature_select_strategy
    # LlavaProcessor writes (size // patch) ** 2 placeholders per image (+ the additional rows, which the "default"
    # strategy removes again); the tower must give that many feature rows, and the bundle must have trained on them.
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    if not num_image_tokens(vision_config) == grid == bundle.vision.num_image_tokens:
        raise ValueError(f"{vision_path} gives {num_image_tokens(vision_config)} image tokens (LlavaProcessor would "
                         f"write {grid}); the bundle was trained with {bundle.vision.num_image_tokens}")
    preprocessor = ImagePreprocessor.from_pretrained(vision_path)
    chat_template(bundle.system_prompt, tokenizer)  # refuses a system prompt it cannot write
    text = model.text_family.to_transformers(model.llm, llm_path)
    config = llava_config(text.config, vision_config, image_token_id=tokenizer.image_token_id, select_strategy=strategy,
                          vision_feature_layer=bundle.vision.feature_layer, dtype=dtype)
    for limit in text.limits:
        print(f"export: warning: {limit}", file=sys.stderr)

    tensors = {
        **{f"language_model.{key}": t for key, t in text.tensors.items()},
        **projector_tensors(model.projector.state_dict()),
        **vision_tensors,
    }
    tensors = {key: t.detach().to(dtype) for key, t in tensors.items()}

    vocab_size = config.text_config.vocab_size
    suppressed, unlisted = _never_produced(tokenizer, vocab_size)
    write_text(folder / "config.json", config.to_json_string())
    shards = save_sharded_safetensors(tensors, folder, max_shard_bytes=max_shard_bytes)
    write_processing_files(folder, tokenizer=tokenizer, tokenizer_json=text.tokenizer_json,
                           system_prompt=bundle.system_prompt, preprocessor=preprocessor,
                           patch_size=vision_config.patch_size, select_strategy=strategy,
                           model_max_length=config.text_config.max_position_embeddings, vocab_size=vocab_size)
    weight_files = [s for s in shards if s.endswith(".safetensors")]
    write_text(folder / "README.md", model_card(
        name=name,
        checkpoint=checkpoint,
        bundle=bundle,
        llm_path=llm_path,
        vision_path=vision_path,
        text=text,
        vision_label=tower.label,
        vision_config=vision_config,
        select_strategy=strategy,
        dtype=str(dtype).removeprefix("torch."),
        num_parameters=sum(t.numel() for t in tensors.values()),
        weight_files=weight_files,
        suppressed=len(suppressed),
        unlisted=len(unlisted),
    ))
    size_gb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1024**3
    print(f"export: {len(tensors)} tensors, {size_gb:.2f} GiB in {len(weight_files)} safetensors file(s), {dtype}",
          file=sys.stderr)
