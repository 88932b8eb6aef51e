"""Build what the CPU demo needs, in the real formats: `python -m demo.prepare --config config.yaml`.

Into the config's `demo.workdir` it writes
  tiny-clip/   a tiny CLIP checkpoint in the openai/clip-vit-large-patch14 layout, given a short contrastive
               image-caption training on pictures drawn for it alone (the real tower was trained that way,
               which is why its patch features tell a circle from a triangle), then frozen in training like
               the real one; its random position embeddings are scaled up so that "where" survives;
  tiny-qwen/   a tiny QWen checkpoint in the Qwen-7B-Chat layout, with a small real BPE vocabulary, given a
               short text pretraining first: ChatML conversations that answer questions about a shape
               *described in words*. This is the miniature of the real recipe's pretrained chat LLM: it knows
               the chat format and the answer words; the VLM training then teaches it to read them from the
               image instead of from the description;
  raw/         the synthetic images and annotations in the LLaVA and AI Challenger formats, and a held-out set.
A `prepared.json` stamp records the settings; running again with the same settings does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from settings import DEFAULT_SYSTEM_PROMPT, ConfigError, build, read_yaml, resolve_path

STAMP = "prepared.json"


@dataclass
class DemoConfig:
    workdir: str = ".demo"
    seed: int = 0
    image_size: int = 112
    n_train_images: int = 1000  # LLaVA-format conversations (6 questions each)
    n_caption_images: int = 300  # AI Challenger-format captions, on other images
    n_heldout_images: int = 200  # for demo_eval.json, on images of neither set
    qwen: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "intermediate_size": 512})
    clip: dict = field(default_factory=lambda: {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "intermediate_size": 256, "patch_size": 14,
                                                "position_embedding_scale": 16.0})
    vocab_size: int = 1024  # BPE ranks of the tiny vocabulary (specials stay at 151643..)
    pretrain_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 3e-3
    clip_pretrain_steps: int = 500  # contrastive image-text training of the tiny CLIP before it is frozen (0: none)
    clip_pretrain_batch_size: int = 64  # distinct captions per batch (at most the 72 there are)
    clip_pretrain_learning_rate: float = 1e-3
    clip_pretrain_images_per_caption: int = 12  # pictures drawn for each of the 72 captions


def load_demo_config(config_path: Path) -> DemoConfig:
    raw = read_yaml(config_path)
    if "demo" not in raw:
        raise ConfigError(f"{config_path}: no 'demo' section: this config is not the demo")
    demo = build(DemoConfig, raw["demo"] or {}, f"{config_path}: demo")
    demo.workdir = resolve_path(demo.workdir, config_path.resolve().parent)
    return demo


# --------------------------------------------------------------------------------------------------
# Text pretraining corpus: the demo's questions, about a shape described in words
# --------------------------------------------------------------------------------------------------


def describe(item, lang: str) -> str:
    if lang == "en":
        return f"The picture shows a {item.answer('colour', 'en')} {item.answer('shape', 'en')} in the {item.answer('position', 'en')} corner."
    return f"图片的{item.answer('position', 'zh')}角有一个{item.answer('colour', 'zh')}的{item.answer('shape', 'zh')}。"


def text_conversation(rng: np.random.Generator):
    """(query, answer): a described shape and a question about it, or a caption request."""
    from dataprocess.aic import PROMPTS as CAPTION_PROMPTS
    from dataset.synthetic import AIC_TEMPLATES, COLOURS, POSITIONS, QUESTIONS, SHAPES, Item

    item = Item(rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), rng.choice(list(POSITIONS)))
    if rng.random() < 0.15:
        caption = AIC_TEMPLATES[rng.integers(len(AIC_TEMPLATES))].format(
            p=item.answer("position", "zh"), c=item.answer("colour", "zh"), s=item.answer("shape", "zh")
        )
        return f"{describe(item, 'zh')}\n{CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]}", caption
    lang, attribute = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
    description = describe(item, lang if rng.random() < 0.8 else ("zh" if lang == "en" else "en"))
    return f"{description}\n{QUESTIONS[lang, attribute]}", item.answer(attribute, lang)


def encode_text_example(tokenizer, query: str, answer: str, system: str) -> tuple[list[int], list[int]]:
    """ChatML ids (the official make_context) + answer + <|im_end|>; labels only on the answer and <|im_end|>."""
    from qwen import make_context

    _, context = make_context(tokenizer, query, history=[], system=system)
    target = tokenizer.encode(answer, allowed_special=set()) + [tokenizer.im_end_id]
    return context + target, [-100] * len(context) + target


def vocab_corpus() -> str:
    """The tiny BPE's training text: the built-in corpus plus the demo's questions and answer words.

    A real Qwen vocabulary has "blue", "circle", "bottom" and "正方形" as whole tokens; learnt from the
    built-in corpus alone, an answer at the start of a reply ("blue", no leading space) is split into
    single letters. Each supervised token costs a 151936-way softmax, so this also keeps training cheap.
    """
    from dataprocess.aic import PROMPTS as CAPTION_PROMPTS
    from dataset.synthetic import ATTRIBUTES, QUESTIONS
    from qwen.tiny_vocab import DEFAULT_CORPUS

    answers = [getattr(word, lang) for vocab in ATTRIBUTES.values() for word in vocab.values() for lang in ("en", "zh")]
    lines = answers * 4 + list(QUESTIONS.values()) + list(CAPTION_PROMPTS)
    return DEFAULT_CORPUS + "\n".join(lines) + "\n"


def pretrain_text(model, tokenizer, demo: DemoConfig, log_every: int = 50) -> list[float]:
    """Full-parameter next-token training on the text corpus (answers supervised). Returns the losses."""
    rng = np.random.default_rng([demo.seed, 7])
    device = next(model.parameters()).device  # CPU in the demo; any device works
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=demo.pretrain_learning_rate, weight_decay=0.0, fused=True)  # 10x faster on CPU
    warmup = max(demo.pretrain_steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(demo.pretrain_steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    losses, started = [], time.time()
    for step in range(demo.pretrain_steps):
        batch = [encode_text_example(tokenizer, *text_conversation(rng), DEFAULT_SYSTEM_PROMPT)
                 for _ in range(demo.pretrain_batch_size)]
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), tokenizer.pad_token_id)
        labels = torch.full((len(batch), T), -100)
        for i, (ids, lab) in enumerate(batch):  # right padding: the causal mask alone keeps pads out of real rows
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
        for group in optimizer.param_groups:
            group["lr"] = demo.pretrain_learning_rate * lr_at(step)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device), return_logits=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  text pretraining step {step + 1}/{demo.pretrain_steps}  loss {loss.item():.3f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# CLIP's own pretraining, in miniature
# --------------------------------------------------------------------------------------------------

CLIP_PROMPT = "a photo of a {c} {s} in the {p} corner"  # CLIP-style English captions


def pretrain_clip(clip_dir: Path, demo: DemoConfig, log_every: int = 50) -> list[float]:
    """Contrastive image-text training of the tiny CLIP (both towers), then saved over its weights.

    The real tower (openai/clip-vit-large-patch14) was trained this way on captioned pictures, which is why
    its patch features tell a circle from a triangle; a random tower's barely do (DEMO-NOTES.md). The
    pictures are drawn here, in memory, from their own random streams ([seed, 100, k]): none of them is a
    VLM training or held-out image. Each batch holds distinct captions (CLIP's loss treats every other
    caption of the batch as a negative). The text tower reads word ids in the official layout: start and
    end of text are the last two ids, and the end of text, the largest id, is where CLIP pools.
    """
    from safetensors.torch import save_file
    from transformers import CLIPModel

    from dataset.synthetic import COLOURS, POSITIONS, SHAPES, Item, draw_image
    from visual import CLIPImagePreprocessor

    model = CLIPModel.from_pretrained(clip_dir)
    processor = CLIPImagePreprocessor.from_pretrained(clip_dir)
    items = [Item(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    captions = [CLIP_PROMPT.format(c=it.colour, s=it.shape, p=it.position).split() for it in items]
    words = {w: i + 1 for i, w in enumerate(sorted({w for caption in captions for w in caption}))}
    vocab_size = model.config.text_config.vocab_size
    sot, eot = vocab_size - 2, vocab_size - 1
    text_ids = torch.tensor([[sot, *(words[w] for w in caption), eot] for caption in captions])  # all equally long

    n = demo.clip_pretrain_images_per_caption
    pictures = [draw_image(item, demo.image_size, np.random.default_rng([demo.seed, 100, k * n + j]))
                for k, item in enumerate(items) for j in range(n)]
    pixels = torch.cat([processor(pictures[i:i + 256]) for i in range(0, len(pictures), 256)])  # [72 n, 3, H, W]

    rng = np.random.default_rng([demo.seed, 101])
    batch = min(demo.clip_pretrain_batch_size, len(items))
    optimizer = torch.optim.AdamW(model.parameters(), lr=demo.clip_pretrain_learning_rate, weight_decay=0.0)
    model.train()
    losses, started = [], time.time()
    for step in range(demo.clip_pretrain_steps):
        chosen = torch.from_numpy(rng.permutation(len(items))[:batch])
        picture = chosen * n + torch.from_numpy(rng.integers(0, n, size=batch))
        loss = model(input_ids=text_ids[chosen], pixel_values=pixels[picture], return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  CLIP pretraining step {step + 1}/{demo.clip_pretrain_steps}  loss {loss.item():.3f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    weights = clip_dir / "model.safetensors"
    partial = weights.with_suffix(".partial")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, partial, metadata={"format": "pt"})
    partial.replace(weights)
    return losses


# --------------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------------


def prepare(demo: DemoConfig, *, force: bool = False) -> Path:
    from dataset.synthetic import write_demo_raw_data
    from qwen import QWenConfig, QWenLMHeadModel, QWenTokenizer
    from qwen.tiny import random_qwen_state_dict, tiny_qwen_config, write_tiny_qwen_checkpoint
    from qwen.tiny_vocab import write_tiny_vocab
    from visual import write_tiny_clip_checkpoint

    work = Path(demo.workdir)
    settings = dataclasses.asdict(demo)
    stamp = work / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"demo: {work} is already prepared with these settings")
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    torch.manual_seed(demo.seed)
    started = time.time()

    clip = dict(demo.clip)
    write_tiny_clip_checkpoint(work / "tiny-clip", image_size=demo.image_size, seed=demo.seed, **clip)
    if demo.clip_pretrain_steps:
        print(f"demo: contrastive pretraining of the tiny CLIP ({demo.clip_pretrain_steps} steps)")
        pretrain_clip(work / "tiny-clip", demo)
    print(f"demo: tiny CLIP written to {work / 'tiny-clip'}")

    paths = write_demo_raw_data(
        work / "raw", n_train=demo.n_train_images, n_aic=demo.n_caption_images, n_heldout=demo.n_heldout_images,
        image_size=demo.image_size, seed=demo.seed,
    )
    print(f"demo: synthetic images and annotations written to {paths['root']}")

    vocab = write_tiny_vocab(work / "qwen.tiktoken", vocab_size=demo.vocab_size, corpus=vocab_corpus())
    tokenizer = QWenTokenizer(vocab)
    config_fields = tiny_qwen_config(**demo.qwen)
    model = QWenLMHeadModel(QWenConfig(**config_fields))
    model.load_state_dict(random_qwen_state_dict(config_fields, seed=demo.seed))
    print(f"demo: text pretraining of the tiny QWen ({demo.pretrain_steps} steps)")
    pretrain_text(model, tokenizer, demo)
    write_tiny_qwen_checkpoint(work / "tiny-qwen", state_dict=model.state_dict(), vocab_file=vocab, **demo.qwen)
    (work / "qwen.tiktoken").unlink()
    print(f"demo: tiny QWen written to {work / 'tiny-qwen'}")

    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    print(f"demo: prepared in {time.time() - started:.0f} s")
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args(argv)
    try:
        demo = load_demo_config(Path(args.config))
    except ConfigError as e:
        print(f"demo.prepare: error: {e}", file=sys.stderr)
        return 2
    prepare(demo, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
