"""The folder of a transformers-native LLaVA: `LlavaForConditionalGeneration` with a Qwen2 text model.

    python -m model.export --checkpoint outputs/demo --output exported-llava/ --format llava [--dtype bf16]

model/export.py checks the output folder, merges the LoRA (in fp32) and stages the folder; `write_llava` here
writes its contents.

The folder loads with stock transformers (`AutoModelForImageTextToText.from_pretrained(DIR)`,
`AutoProcessor.from_pretrained(DIR)`, no trust_remote_code) and serves with `vllm serve DIR`:

    config.json                      LlavaConfig: CLIP vision config, vision_feature_layer, select strategy
                                     "default" (CLS dropped), image_token_index 151646 (<|extra_0|>), Qwen2 text config
    model*.safetensors (+ index)     llava-hf's tensor names: language_model.model.*, language_model.lm_head,
                                     multi_modal_projector.linear_1/linear_2, vision_tower.vision_model.*
    tokenizer.json                   byte-level BPE with the ids of qwen.tiktoken (qwen/fast_tokenizer.py)
    tokenizer_config.json            eos <|im_end|>, pad <|endoftext|>, no bos, left padding
    chat_template.jinja              our ChatML prompt with the trained system prompt (model/llava_chat_template.py)
    preprocessor_config.json         the CLIP image processor, with the settings our preprocessing uses
    processor_config.json            LlavaProcessor: image token, patch size, strategy, 1 additional token (CLS)
    generation_config.json           infer.py's defaults: greedy, stops at <|im_end|>, <|im_start|>, <|endoftext|>,
                                     suppresses the specials an answer may not hold (suppressed_token_ids)
    README.md                        model card

QWen v1 is the Qwen2 architecture within `seq_length`: RMSNorm, rotary (all channels), bias on q/k/v only,
SwiGLU. Mapping: wte -> embed_tokens, ln_1/ln_2 -> input/post_attention_layernorm, c_attn split in three along
the output dimension -> q/k/v (weights and biases), attn.c_proj -> o_proj, mlp.w2 -> gate_proj (SiLU is applied
to w2's output), mlp.w1 -> up_proj, mlp.c_proj -> down_proj, ln_f -> norm; Qwen2's intermediate_size is half of
QWen's. Past `seq_length` QWen switches on dynamic NTK and logn attention scaling, which Qwen2 does not have:
max_position_embeddings is set to seq_length and the export warns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

from common.fileio import write_json, write_text
from qwen import IMAGE_TAG, IMAGE_TOKEN_ID, QWenConfig, QWenTokenizer
from qwen.chat_format import answer_token_ids, stop_token_ids
from qwen.checkpoint import save_sharded_safetensors
from qwen.fast_tokenizer import build_fast_tokenizer
from qwen.tokenization_qwen import ENDOFTEXT, IM_END, SPECIAL_START_ID, VOCAB_FILE_NAME
from visual.clip_tower import CHECKPOINT_PREFIX, IGNORED_VISION_KEYS, inspect_checkpoint, num_image_tokens
from visual.images import CLIPImagePreprocessor

from .bundle import BundleConfig
from .llava_chat_template import chat_template
from .model_card import model_card


def qwen2_text_config(qwen: QWenConfig) -> Qwen2Config:
    """The Qwen2 config that computes what `qwen` computes up to its seq_length. ValueError for a QWen that
    Qwen2 cannot express."""
    qwen.validate_architecture()
    if qwen.rotary_pct != 1.0:
        raise ValueError(f"rotary_pct={qwen.rotary_pct}: Qwen2 rotates every channel of each head (rotary_pct 1.0)")
    if not qwen.no_bias:
        raise ValueError("no_bias=false: Qwen2 has no bias on o_proj and the MLP (every Qwen-7B release has no_bias=true)")
    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=qwen.vocab_size,
        hidden_size=qwen.hidden_size,
        intermediate_size=qwen.intermediate_size // 2,  # QWen's counts w1 and w2 together
        num_hidden_layers=qwen.num_hidden_layers,
        num_attention_heads=qwen.num_attention_heads,
        num_key_value_heads=qwen.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=qwen.seq_length,
        rms_norm_eps=qwen.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(qwen.rotary_emb_base)},
        tie_word_embeddings=qwen.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
    )


def language_model_tensors(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """QWen's state dict (official names) -> llava-hf names of the Qwen2 language model; every tensor used once."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"the merged model has no tensor {name}")
        used.add(name)
        return state[name]

    lm = "language_model.model."
    out[lm + "embed_tokens.weight"] = take("transformer.wte.weight")
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"{lm}layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "ln_1.weight")
        for kind in ("weight", "bias"):
            q, k, v = take(src + f"attn.c_attn.{kind}").chunk(3, dim=0)  # [3h, ...] -> q, k, v in this order
            out[dst + f"self_attn.q_proj.{kind}"] = q
            out[dst + f"self_attn.k_proj.{kind}"] = k
            out[dst + f"self_attn.v_proj.{kind}"] = v
        out[dst + "self_attn.o_proj.weight"] = take(src + "attn.c_proj.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "ln_2.weight")
        out[dst + "mlp.gate_proj.weight"] = take(src + "mlp.w2.weight")  # QWen: c_proj(w1(x) * silu(w2(x)))
        out[dst + "mlp.up_proj.weight"] = take(src + "mlp.w1.weight")
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.c_proj.weight")
    out[lm + "norm.weight"] = take("transformer.ln_f.weight")
    if "lm_head.weight" in state:  # absent when tied to the embeddings
        out["language_model.lm_head.weight"] = take("lm_head.weight")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"tensors of the merged model with no place in Qwen2: {left[:5]}")
    return out


def projector_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"multi_modal_projector.{name}": state[f"projector.{name}"]
            for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}


def vision_tower_tensors(vision_path: str | os.PathLike) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """The whole CLIP vision model of the base folder (every layer; the text tower is left out), llava-hf names.
    The folder is checked first (visual.clip_tower.inspect_checkpoint: tensors, image processor crop)."""
    config, files, found = inspect_checkpoint(Path(vision_path))
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name, (where, _) in found.items():
                if where == file and name not in IGNORED_VISION_KEYS:
                    tensors[f"vision_tower.{CHECKPOINT_PREFIX}{name}"] = f.get_tensor(CHECKPOINT_PREFIX + name)
    return config, tensors


def image_processor_config(preprocessor: CLIPImagePreprocessor) -> dict:
    """transformers' CLIPImageProcessor settings that do what `preprocessor` does (tested pixel for pixel)."""
    height, width = preprocessor.crop_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_convert_rgb": preprocessor.do_convert_rgb,
        "do_resize": preprocessor.do_resize,
        "size": {"shortest_edge": preprocessor.size},
        "resample": preprocessor.resample,
        "do_center_crop": preprocessor.do_center_crop,
        "crop_size": {"height": height, "width": width},
        "do_rescale": preprocessor.do_rescale,
        "rescale_factor": preprocessor.rescale_factor,
        "do_normalize": preprocessor.do_normalize,
        "image_mean": list(preprocessor.image_mean),
        "image_std": list(preprocessor.image_std),
    }


def suppressed_token_ids(tokenizer: QWenTokenizer, vocab_size: int) -> list[int]:
    """The ids from the first special token on that an answer may not hold: the `<|extra_N|>` tokens (the image
    placeholder among them) and the embedding rows past the last special. For Qwen-7B's vocabulary (151,643
    ranks) these are all the ids our generation never produces (290 of 151,936).

    Not listed: the ids between the tokenizer's last rank and the first special, which only a tokenizer smaller
    than the embedding has (the demo's tiny BPE: 150,619 ids, a 1.7 MB list). No text contains them, so training
    only ever lowered their scores, and a trained model does not rank them first (measured on the demo: the same
    greedy answers with and without them); an untrained one may, and infer.py masks them all the same."""
    allowed = set(answer_token_ids(tokenizer))
    return [i for i in range(SPECIAL_START_ID, vocab_size) if i not in allowed]


def unlisted_token_ids(tokenizer: QWenTokenizer) -> range:
    """The ids our generation never produces that `suppressed_token_ids` leaves out (see there)."""
    return range(min(len(tokenizer.mergeable_ranks), SPECIAL_START_ID), SPECIAL_START_ID)


def generation_config(tokenizer: QWenTokenizer, vocab_size: int) -> dict:
    """What `inference.generate_answers` does by default (infer.py without --temperature): greedy, no repetition
    penalty, at most 512 new tokens, our stop ids, and `suppressed_token_ids` suppressed (transformers applies
    them; vLLM ignores suppress_tokens)."""
    return {
        "eos_token_id": stop_token_ids(tokenizer),  # <|im_end|>, <|im_start|>, <|endoftext|>
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,
        "repetition_penalty": 1.0,
        "max_new_tokens": 512,
        "suppress_tokens": suppressed_token_ids(tokenizer, vocab_size),
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as written, in transformers 4 and 5
        "processor_class": "LlavaProcessor",
        "bos_token": None,
        "eos_token": IM_END,  # the end of an answer
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,  # the chat template's markers must become control tokens
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation
    }


def write_tokenizer_files(folder: Path, *, vocab_file: Path, model_max_length: int) -> None:
    """tokenizer.json (the fast tokenizer rebuilt from `vocab_file`) and tokenizer_config.json."""
    write_text(folder / "tokenizer.json", build_fast_tokenizer(vocab_file).to_str(pretty=True))
    write_json(folder / "tokenizer_config.json", tokenizer_config(model_max_length))


def llava_config(qwen: QWenConfig, vision_config: CLIPVisionConfig, *, vision_feature_layer: int,
                 dtype: torch.dtype) -> LlavaConfig:
    return LlavaConfig(
        architectures=["LlavaForConditionalGeneration"],
        vision_config=vision_config,
        text_config=qwen2_text_config(qwen),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=num_image_tokens(vision_config),
        projector_hidden_act="gelu",  # model.modeling_vlm.Projector: nn.GELU(), the exact (erf) form
        vision_feature_select_strategy="default",  # CLS dropped, as visual.CLIPVisionTower does
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=qwen.tie_word_embeddings,
        dtype=str(dtype).removeprefix("torch."),
    )


def write_processing_files(folder: Path, *, vocab_file: Path, system_prompt: str, preprocessor: CLIPImagePreprocessor,
                           patch_size: int, model_max_length: int, vocab_size: int) -> None:
    """Everything but the weights and config.json: tokenizer, chat template, processor and generation configs."""
    write_tokenizer_files(folder, vocab_file=vocab_file, model_max_length=model_max_length)
    write_text(folder / "chat_template.jinja", chat_template(system_prompt))
    write_json(folder / "preprocessor_config.json", image_processor_config(preprocessor))
    write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TAG,
        "patch_size": patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # CLIP's CLS; "default" removes it again: (S / patch)^2 placeholders
    })
    write_json(folder / "generation_config.json", generation_config(QWenTokenizer(vocab_file), vocab_size))


def write_llava(folder: Path, model, bundle: BundleConfig, *, checkpoint: Path, llm_path: Path, vision_path: Path,
                dtype: torch.dtype, max_shard_bytes: int, name: str) -> None:
    """Write the LLaVA folder of `model` (a QWenVLForCausalLM with its LoRA merged) into the empty `folder`.
    ValueError for a model or bundle the LLaVA layout cannot express, before anything is written."""
    qwen = model.config
    if bundle.image_token_id != IMAGE_TOKEN_ID:
        raise ValueError(f"the bundle's image_token_id {bundle.image_token_id} is not {IMAGE_TAG} "
                         f"({IMAGE_TOKEN_ID}), the image tag of our prompts")
    vision_config, vision_tensors = vision_tower_tensors(vision_path)
    if num_image_tokens(vision_config) != bundle.num_image_tokens:
        raise ValueError(f"{vision_path} gives {num_image_tokens(vision_config)} image tokens, the bundle was trained "
                         f"with {bundle.num_image_tokens}")
    preprocessor = CLIPImagePreprocessor.from_pretrained(vision_path)
    chat_template(bundle.system_prompt)  # refuses a system prompt it cannot write
    config = llava_config(qwen, vision_config, vision_feature_layer=bundle.vision_feature_layer, dtype=dtype)
    if qwen.use_dynamic_ntk or qwen.use_logn_attn:
        print(f"export: warning: max_position_embeddings = seq_length = {qwen.seq_length}. Up to there the export "
              f"computes what QWen computes; past it QWen switches on dynamic NTK rotary scaling and logn attention "
              f"scaling, which Qwen2 does not have, so longer contexts give different (likely worse) outputs.",
              file=sys.stderr)

    state = model.state_dict()
    tensors = {
        **language_model_tensors({k: v for k, v in state.items() if not k.startswith(("projector.", "vision_tower."))},
                                 qwen.num_hidden_layers),
        **projector_tensors(state),
        **vision_tensors,
    }
    tensors = {key: t.detach().to(dtype) for key, t in tensors.items()}

    write_text(folder / "config.json", config.to_json_string())
    shards = save_sharded_safetensors(tensors, folder, max_shard_bytes=max_shard_bytes)
    write_processing_files(folder, vocab_file=llm_path / VOCAB_FILE_NAME, system_prompt=bundle.system_prompt,
                           preprocessor=preprocessor, patch_size=vision_config.patch_size,
                           model_max_length=qwen.seq_length, vocab_size=qwen.vocab_size)
    weight_files = [s for s in shards if s.endswith(".safetensors")]
    tokenizer = QWenTokenizer(llm_path / VOCAB_FILE_NAME)
    write_text(folder / "README.md", model_card(
        name=name,
        checkpoint=checkpoint,
        bundle=bundle,
        llm_path=llm_path,
        vision_path=vision_path,
        qwen=qwen,
        vision_config=vision_config,
        dtype=str(dtype).removeprefix("torch."),
        num_parameters=sum(t.numel() for t in tensors.values()),
        weight_files=weight_files,
        suppressed=len(suppressed_token_ids(tokenizer, qwen.vocab_size)),
        unlisted=len(unlisted_token_ids(tokenizer)),
    ))
    size_gb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1024**3
    print(f"export: {len(tensors)} tensors, {size_gb:.2f} GiB in {len(weight_files)} safetensors file(s), {dtype}",
          file=sys.stderr)
