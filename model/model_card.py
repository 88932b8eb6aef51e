"""The README.md model card of a transformers-native export: what the model is, how it was trained, how to use it.

Everything in it comes from the bundle folder and the base models' configs: `vlm_config.json`, the LoRA's
`adapter_config.json`, the newest `trainer_state.json` (the bundle's own, or its newest `checkpoint-N/`), and the
evaluation files that training and evaluation write next to the weights (`eval_results.json`, `demo_eval.json`,
`metrics.json`), each shown only when present. Nothing is invented: what the bundle does not record (its data)
is said to be unrecorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EVALUATION_FILES = ("eval_results.json", "demo_eval.json", "metrics.json")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Scalars of a (nested) dict as (dotted key, value); lists, long strings and absolute paths (which would name
    folders of the training machine) are left out."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        elif isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 120
                                                          and not os.path.isabs(value)):
            rows.append((name, round(value, 4) if isinstance(value, float) else value))
    return rows


def _trainer_state(checkpoint: Path) -> tuple[Path, dict] | None:
    candidates = [checkpoint / "trainer_state.json", *checkpoint.glob("checkpoint-*/trainer_state.json")]
    states = [(path, state) for path in candidates if path.is_file() and (state := _read_json(path)) is not None]
    if not states:
        return None
    return max(states, key=lambda item: item[1].get("global_step", -1))


def _training_lines(checkpoint: Path, bundle, text, vision_label: str) -> list[str]:
    lines = [f"- The projector (Linear → GELU → Linear) was trained; the {vision_label} tower stayed frozen."]
    adapter = _read_json(checkpoint / "adapter_config.json") if bundle.adapter else None
    if adapter:
        targets = adapter.get("target_modules")
        targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
        renamed = f" ({text.converted_from} names; exported as: {text.renamed})" if text.renamed else ""
        lines.append(f"- LoRA on the LLM, merged into these weights: r = {adapter.get('r')}, "
                     f"alpha = {adapter.get('lora_alpha')}, dropout = {adapter.get('lora_dropout')}, "
                     f"targets: {targets}{renamed}.")
        if adapter.get("modules_to_save"):
            lines.append(f"- Trained in full: {', '.join(adapter['modules_to_save'])}.")
        if bundle.text.quantization != "none":
            lines.append(f"- Trained as QLoRA: the LLM's linear weights were held in 4-bit "
                         f"{bundle.text.quantization.upper()} during training; the LoRA is merged into the original "
                         "weights, so these are full precision and compute slightly otherwise than the 4-bit model "
                         "that was trained.")
    elif bundle.merged:
        lines.append("- The checkpoint was already a merged export: its LLM weights are taken as they are.")
    else:
        lines.append("- The LLM was not adapted (no LoRA adapter in the checkpoint).")
    found = _trainer_state(checkpoint)
    if found:
        path, state = found
        logged = state.get("log_history") or []
        train_losses = [row["loss"] for row in logged if isinstance(row, dict) and "loss" in row]
        eval_losses = [row["eval_loss"] for row in logged if isinstance(row, dict) and "eval_loss" in row]
        facts = [f"{state.get('global_step')} optimizer steps", f"{round(state.get('epoch') or 0, 2)} epochs"]
        if state.get("train_batch_size"):
            facts.append(f"batch size {state['train_batch_size']} per device")
        if train_losses:
            facts.append(f"last logged training loss {train_losses[-1]:.4f}")
        if eval_losses:
            facts.append(f"last evaluation loss {eval_losses[-1]:.4f}")
        lines.append(f"- Progress ({path.relative_to(checkpoint)}): {', '.join(facts)}.")
    lines.append(f"- System prompt the model was trained with (the chat template's default): "
                 f"{json.dumps(bundle.system_prompt, ensure_ascii=False)}")
    return lines


def _evaluation_lines(checkpoint: Path) -> list[str]:
    lines = []
    for name in EVALUATION_FILES:
        values = _read_json(checkpoint / name)
        rows = _flatten(values) if values else []
        if not rows:
            continue
        lines += ["", f"From `{name}` of the checkpoint:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in rows]
    return lines or ["", "No evaluation results were found next to the checkpoint (eval_results.json, "
                     "demo_eval.json, metrics.json)."]


def _generation_lines(image_token: str, suppressed: int, unlisted: int) -> list[str]:
    """What generation_config.json holds, and why its suppress_tokens is what it is
    (model.export_llava.suppressed_token_ids)."""
    lines = [
        "generation_config.json gives the original's defaults: greedy, no repetition penalty, at most 512 new tokens, "
        "stop at `<|im_end|>`, `<|im_start|>` or `<|endoftext|>`. Its `suppress_tokens` lists the "
        f"{suppressed:,} ids from the tokenizer's first special token on that an answer may not hold (the special and "
        f"added tokens other than those three, the image placeholder `{image_token}` among them, and the embedding "
        "rows past the tokenizer), which the original never produces. transformers applies the list; vLLM ignores "
        "`suppress_tokens` and relies on the trained model not ranking these ids first (a trained model was never "
        "shown them as a target).",
    ]
    if unlisted:
        lines += [
            "",
            f"The original never produces {unlisted:,} more ids either: those below the first special token that its "
            "tokenizer has no token for (its tokenizer is smaller than the embedding). They are not listed: no text "
            "contains them, so training only ever lowered their scores and a trained model does not rank them first, "
            "and the list would grow to megabytes for a setting that vLLM ignores anyway.",
        ]
    return lines


def _architecture(config) -> str:
    """The transformers name of a config's model: "Qwen2", "Qwen3", "CLIPVision", "SiglipVision"."""
    return type(config).__name__.removesuffix("Config")


def model_card(*, name: str, checkpoint: Path, bundle, llm_path: Path, vision_path: Path, text, vision_label: str,
               vision_config, select_strategy: str, dtype: str, num_parameters: int, weight_files: list[str],
               suppressed: int, unlisted: int) -> str:
    """The README.md text (Markdown with a small YAML header). `text` is the language model as exported
    (llm.base.TransformersText), `vision_config` the exported vision config of the `vision_label` tower.
    `suppressed`: the length of generation_config's suppress_tokens; `unlisted`: the ids the original never
    produces that it leaves out (model.export_llava.suppressed_token_ids says which and why)."""
    n_tokens = bundle.vision.num_image_tokens
    llm = text.config
    language = _architecture(llm)
    converted = (f" The language model was trained as {text.converted_from}; it is written here as {language}, "
                 f"without changing what it computes (see Limits)." if text.converted_from else "")
    rows = "CLS dropped" if select_strategy == "default" else "every patch"
    kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"tags: [llava, qwen, {bundle.vision.family}, vision-language]",
        "---",
        "",
        f"# {name}",
        "",
        f"A vision-language model in transformers' native LLaVA layout (`LlavaForConditionalGeneration`): a "
        f"{vision_label} vision tower, a two-layer GELU projector and a {language} language model, trained with the "
        f"build-your-own-vlm recipe.{converted}",
        "",
        f"{num_parameters / 1e9:.2f} B parameters, {dtype}, in {len(weight_files)} safetensors file(s).",
        "",
        "## Base models",
        "",
        f"- Language model: `{llm_path.name}` ({text.converted_from or language}: hidden size {llm.hidden_size}, "
        f"{llm.num_hidden_layers} layers, {llm.num_attention_heads} heads ({kv_heads} key/value), vocabulary "
        f"{llm.vocab_size} rows, {'tied' if llm.tie_word_embeddings else 'untied'} input and output embeddings, "
        f"context {llm.max_position_embeddings} tokens).",
        f"- Vision tower: `{vision_path.name}` ({vision_label} ViT: {vision_config.image_size} px, patch "
        f"{vision_config.patch_size}, {vision_config.num_hidden_layers} layers, hidden size "
        f"{vision_config.hidden_size}); features of hidden layer {bundle.vision.feature_layer}, {rows}: "
        f"{n_tokens} image tokens per image.",
        "",
        "## Training",
        "",
        *_training_lines(checkpoint, bundle, text, vision_label),
        "",
        "## Data",
        "",
        "The checkpoint does not record the data it was trained on. The recipe it comes from trains on COCO2017 "
        "images with LLaVA's complex_reasoning_77k conversations and on AI Challenger Chinese captions; its CPU "
        "demo trains tiny models on synthetic pictures of coloured shapes.",
        "",
        "## Evaluation",
        *_evaluation_lines(checkpoint),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "from PIL import Image",
        f'model = AutoModelForImageTextToText.from_pretrained("{name}")',
        f'processor = AutoProcessor.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": [{"type": "image", "image": Image.open("photo.jpg")},',
        '                                         {"type": "text", "text": "What is in the picture?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,",
        '                                       return_tensors="pt")',
        "out = model.generate(**inputs)  # greedy, stops at <|im_end|> (generation_config.json)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        f"Serving: `vllm serve {name}` (OpenAI-compatible; send `temperature: 0` for the greedy answers above).",
        "",
        *_generation_lines(bundle.image_token, suppressed, unlisted),
        "",
        "## Prompt format",
        "",
        "ChatML: `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>"
        f"\\n<|im_start|>assistant\\n`. Each image is `{bundle.image_token}` (id {bundle.image_token_id}), which the "
        f"processor expands to {n_tokens} placeholders. Images that come before a message's text are written one per "
        "line in front of it (the training layout); images placed after some text are written where they are.",
        "",
        f"Message text containing the text of a special or added token (`<|im_end|>`, `{bundle.image_token}`, ...) is "
        "refused by the chat template: the model was trained with such text kept as text, and a rendered prompt "
        "cannot keep it so. To tokenize typed text yourself as the training did, use "
        "`tokenizer(text, split_special_tokens=True)`.",
        "",
        "## Limits",
        "",
        *(f"- {limit}" for limit in text.limits),
        f"- transformers picks the torchvision implementation of the {vision_label} image processor when torchvision "
        "is installed; it differs from the PIL implementation used in training by up to about 0.03 per normalised "
        "pixel value. `AutoProcessor.from_pretrained(DIR, backend=\"pil\")` gives the training pixels exactly.",
        "",
    ]
    return "\n".join(lines)
