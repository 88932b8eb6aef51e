"""The demo's two miniature pretrainings, run by demo.prepare before the VLM training:

- the tiny QWen's text pretraining: ChatML conversations that answer questions about a shape *described in
  words*, asked in many wordings (demo/wordings.py: the image training's and the text-only ones), English and
  Chinese (the miniature of the real recipe's pretrained chat LLM: it knows the chat format, the answer words
  and the language of the questions; the VLM training then teaches it to read the shape from the image
  instead of from the description, in a few wordings, and the others carry over);
- the tiny CLIP's contrastive image-caption training (the real tower was trained that way, which is why its
  patch features tell a circle from a triangle), after which it is frozen like the real one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from common.safetensors_file import save_safetensors
from dataprocess.aic import PROMPTS as CAPTION_PROMPTS
from dataprocess.schema import ASSISTANT, USER
from dataset.conversation import encode_conversation
from demo.compact_vocab import CompactVocab
from demo.synthetic import AIC_TEMPLATES, ATTRIBUTES, COLOURS, POSITIONS, SHAPES, Item, draw_image
from demo.wordings import KINDS, SETS, pretraining_wordings
from qwen import DEFAULT_SYSTEM, QWenConfig, QWenLMHeadModel
from qwen.tiny_vocab import DEFAULT_CORPUS
from settings import DemoConfig
from visual import ImagePreprocessor

# --------------------------------------------------------------------------------------------------
# Text pretraining corpus: the demo's questions, about a shape described in words
# --------------------------------------------------------------------------------------------------


EN_DESCRIPTION = "The picture shows a {c} {s} in the {p} corner."
ZH_DESCRIPTION = "图片的{p}角有一个{c}的{s}。"


def describe(item, lang: str) -> str:
    template = EN_DESCRIPTION if lang == "en" else ZH_DESCRIPTION
    return template.format(c=item.answer("colour", lang), s=item.answer("shape", lang), p=item.answer("position", lang))


MAX_TEXT_TURNS = 4  # questions about one described shape, as the image training asks several about one image
SINGLE_TURN_SHARE = 0.5  # the rest: 2 to MAX_TEXT_TURNS questions
# The first SHORT_STEPS_SHARE of the steps train on short rows: one question, no system prompt. Which description
# word answers which question is learnt sooner in short rows (measured: with them, 600 steps teach what 1,500 steps
# of full-length rows did not for every seed); the rest of the steps are in the full chat format.
SHORT_STEPS_SHARE = 0.5


_LABELS = (tuple(COLOURS), tuple(SHAPES), tuple(POSITIONS))


def random_item(rng: np.random.Generator) -> Item:
    """A uniformly random (colour, shape, corner): the draws of `rng.choice` on each label list (the same stream
    and the same picks: choice draws `integers(0, len)`), without its conversion of the list to an array."""
    return Item(*(labels[rng.integers(len(labels))] for labels in _LABELS))


def text_conversation(rng: np.random.Generator, n_turns: int | None = None) -> list[tuple[str, str]]:
    """[(query, answer), ...]: a described shape, then `n_turns` (default: random, 1 to MAX_TEXT_TURNS) questions
    about it (the description in the first query, in that question's language 4 times in 5; each question of a
    random kind, in a random wording of `pretraining_wordings`), or one caption request."""
    item = random_item(rng)
    if rng.random() < 0.12:
        caption = AIC_TEMPLATES[rng.integers(len(AIC_TEMPLATES))].format(
            p=item.answer("position", "zh"), c=item.answer("colour", "zh"), s=item.answer("shape", "zh")
        )
        return [(f"{describe(item, 'zh')}\n{CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]}", caption)]
    turns, languages = [], []
    if n_turns is None:
        n_turns = random_turns(rng)
    for _ in range(n_turns):
        lang, attribute = KINDS[rng.integers(len(KINDS))]
        choices = pretraining_wordings((lang, attribute))
        turns.append([choices[rng.integers(len(choices))], item.answer(attribute, lang)])
        languages.append(lang)
    # mostly described in the first question's language: copying the answer word is learnt first, translating it later
    lang = languages[0] if rng.random() < 0.8 else ("zh" if languages[0] == "en" else "en")
    turns[0][0] = f"{describe(item, lang)}\n{turns[0][0]}"
    return [(query, answer) for query, answer in turns]


def random_turns(rng: np.random.Generator) -> int:
    return 1 if rng.random() < SINGLE_TURN_SHARE else int(rng.integers(2, MAX_TEXT_TURNS + 1))


def encode_text_example(tokenizer, turns: list[tuple[str, str]], system: str) -> tuple[list[int], list[int]]:
    """ChatML ids of the conversation, as the VLM training encodes one (dataset.conversation); labels only on
    the answers and their <|im_end|>."""
    messages = [m for query, answer in turns for m in ({"role": USER, "content": query},
                                                       {"role": ASSISTANT, "content": answer})]
    encoded = encode_conversation(tokenizer, messages, system=system, num_image_tokens=1, max_length=None)  # no <image>
    return encoded.input_ids, encoded.labels


# Text about the demo's world (coloured shapes in a picture), in English and Chinese.
DEMO_CORPUS = """\
What is in this picture? This picture shows a red circle in the top left corner.
There is a green square in the top right corner and a blue triangle in the bottom left corner.
A yellow circle is at the bottom right. The purple square is in the middle of the image.
An orange triangle sits near the left edge; a red square sits near the right edge.
What color is the circle? The circle is red. What shape is at the top? A green square is at the top.
Where is the blue triangle? The blue triangle is in the bottom left of the picture.
How many shapes are there? There are three shapes: a circle, a square and a triangle.
Which shape is on the left? The yellow triangle is on the left, and the purple circle is on the right.
The colors are red, green, blue, yellow, purple and orange. The shapes are circle, square and triangle.
Describe the image. The image has a white background with two shapes: an orange circle at the top
and a blue square at the bottom. The circle is small and the square is large.
Is there a red triangle? No, there is no red triangle. There is a red circle and a green triangle.
Please describe the colors and positions of all shapes in the picture, one by one.
User: What do you see? Assistant: I see a purple triangle in the top right corner of the picture.
You are a helpful assistant. Answer the question about the image in one short sentence.
What is in the picture?
A red circle and a blue square.
Each shape has one color and one position. The big square is blue; the small circle is orange.
The learning rate was 0.0002, the batch size was 16, and each image became 256 tokens.
for shape in ["circle", "square", "triangle"]:
    print(f"{shape}: {area(3, 4)}")
    result = {"color": "red", "shape": "circle", "position": [1, 2]}
Count the objects: one circle, two squares, three triangles, four stars and five lines.
Move the small green circle to the upper left, then put the large orange square in the lower right.
这是什么？这是一张图片。图片的左上角有一个红色的圆形，右上角有一个绿色的正方形。
左下角有一个蓝色的三角形，右下角有一个黄色的圆形。图片中间有一个紫色的正方形。
这个圆形是什么颜色？这个圆形是红色的。这个三角形在什么位置？这个三角形在左下角。
图片里有几个形状？图片里有三个形状：一个圆形、一个正方形和一个三角形。
请描述图片中每个形状的颜色和位置。橙色的三角形在右上，紫色的圆形在左上。
颜色有红色、绿色、蓝色、黄色、紫色和橙色。形状有圆形、正方形和三角形。
位置有左上、右上、左下、右下、上面、下面、左边、右边和中间。
这张图片的背景是白色的，上面有两个形状：一个橙色的圆形和一个蓝色的正方形。
图片上方是一个绿色的正方形，下方是一个红色的三角形。这是什么形状？这是正方形。
用户：你看到了什么？助手：我看到图片右下角有一个黄色的三角形。
你是一个有用的助手。请用一句话回答关于图片的问题。
模型在七万七千条对话和二十一万条描述上训练了三轮，每张图片变成二百五十六个词元。
红色。绿色。蓝色。黄色。紫色。橙色。圆形。正方形。三角形。
左上，右上，左下，右下。颜色，形状，位置，图片。这是什么？这是什么颜色？这是什么形状？
数一数：一个圆形，两个正方形，三个三角形，四颗星星和五条线。
把小的绿色圆形移到左上，再把大的橙色正方形放到右下。请看图片并回答问题。
"""


def vocab_corpus() -> str:
    """The tiny BPE's training text: the built-in corpus, the demo's own text, its questions and answer words.

    A real Qwen vocabulary has "blue", "circle", "bottom" and "正方形" as whole tokens; learnt from the
    built-in corpus alone, an answer at the start of a reply ("blue", no leading space) is split into
    single letters; whole words also keep the rows short.
    """
    answers = [getattr(word, lang) for vocab in ATTRIBUTES.values() for word in vocab.values() for lang in ("en", "zh")]
    questions = [w for kind in KINDS for w in pretraining_wordings(kind)]  # never NEVER_SEEN: no text contains them
    lines = answers * 4 + questions + list(CAPTION_PROMPTS)
    return DEFAULT_CORPUS + DEMO_CORPUS + "\n".join(lines) + "\n"


def pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on padding): the causal mask alone keeps pads out of real rows."""
    T = max(len(ids) for ids, _ in batch)
    input_ids = np.full((len(batch), T), pad_id, dtype=np.int64)
    labels = np.full((len(batch), T), -100, dtype=np.int64)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def text_batch(tokenizer, rng: np.random.Generator, batch_size: int, short: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` text conversations (full-vocabulary ids), padded, every token supervised (next-token
    prediction on the whole text, as a pretraining is; the answers alone are too little signal for a model this
    small). `short`: one question each and no system prompt. One number of questions per batch, so that its rows
    are about equally long (little padding)."""
    n_turns = 1 if short else random_turns(rng)
    system = "" if short else DEFAULT_SYSTEM
    batch = [encode_text_example(tokenizer, text_conversation(rng, n_turns), system)[0] for _ in range(batch_size)]
    return pad_batch([(ids, ids) for ids in batch], tokenizer.pad_token_id)


def text_vocab(tokenizer, full_size: int) -> CompactVocab:
    """The ids the demo's text uses: every BPE rank of the tiny vocabulary and the three ChatML specials."""
    used = list(range(len(tokenizer.mergeable_ranks))) + [tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id]
    return CompactVocab(used, full_size)


def pretrain_text(state_dict: dict, config_fields: dict, tokenizer, demo: DemoConfig, log_every: int = 100):
    """Full-parameter next-token training on the text corpus (every token; short rows for the first
    SHORT_STEPS_SHARE of the steps), over the compact vocabulary (demo/compact_vocab.py: the loss of the
    full-size model at a fraction of the cost).

    Takes and returns full-size state dicts (the official layout): (trained state dict, losses, the share of
    described-shape questions answered right per question kind after training, `text_accuracy`).
    """
    vocab = text_vocab(tokenizer, config_fields["vocab_size"])
    model = QWenLMHeadModel(QWenConfig(**{**config_fields, "vocab_size": vocab.size}))
    model.load_state_dict(vocab.shrink(state_dict))
    vocab.install_head(model)
    rng = np.random.default_rng([demo.seed, 7])
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: 10x faster on CPU
    optimizer = torch.optim.AdamW(params, lr=demo.pretrain_learning_rate, weight_decay=0.0, fused=True)
    warmup = max(demo.pretrain_steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(demo.pretrain_steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    losses, started = [], time.time()
    for step in range(demo.pretrain_steps):
        short = step < SHORT_STEPS_SHARE * demo.pretrain_steps
        input_ids, labels = text_batch(tokenizer, rng, demo.pretrain_batch_size, short)
        for group in optimizer.param_groups:
            group["lr"] = demo.pretrain_learning_rate * lr_at(step)
        loss = model(input_ids=vocab.compact_ids(input_ids), labels=vocab.compact_ids(labels), return_logits=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  text pretraining step {step + 1}/{demo.pretrain_steps}  loss {loss.item():.3f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    model.eval()
    accuracy = text_accuracy(model, tokenizer, demo.seed, vocab=vocab)
    print("  text pretraining: described-shape answers right: "
          + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    return vocab.expand(model.state_dict(), state_dict), losses, accuracy


@torch.no_grad()
def text_accuracy(model, tokenizer, seed: int, n_per_kind: int = 40, vocab: CompactVocab | None = None) -> dict:
    """Share of described-shape questions the QWen answers exactly, greedily: {"<set> <lang> <attribute>": share}
    for the trained and text-only wordings (demo/wordings.py; one question per described shape, a random
    wording of the set), and the never-seen ones for comparison.

    `model` is a full-size QWenLMHeadModel, or the compact one of `vocab`. Teacher-forced: an answer counts when
    the argmax at every supervised position (its tokens and <|im_end|>) is the expected token, which is exactly
    when greedy decoding produces it and stops.
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng([seed, 8])
    out = {}
    for which in SETS:
        for lang, attribute in KINDS:
            choices = SETS[which][lang, attribute]
            batch = []
            for _ in range(n_per_kind):
                item = random_item(rng)
                query = f"{describe(item, lang)}\n{choices[rng.integers(len(choices))]}"
                batch.append(encode_text_example(tokenizer, [(query, item.answer(attribute, lang))], DEFAULT_SYSTEM))
            input_ids, labels = pad_batch(batch, tokenizer.pad_token_id)
            if vocab is not None:
                input_ids, labels = vocab.compact_ids(input_ids), vocab.compact_ids(labels)
            hidden = model.transformer(input_ids=input_ids).last_hidden_state[:, :-1]  # [B, T-1, hidden]
            target = labels[:, 1:]
            keep = target != -100
            picked = hidden[keep]  # logits only where an answer token is predicted
            logits = vocab.greedy_logits(model, picked) if vocab is not None else model.lm_head(picked)
            right = torch.ones_like(target, dtype=torch.bool)
            right[keep] = logits.argmax(-1) == target[keep]
            out[f"{which} {lang} {attribute}"] = round(float(right.all(dim=1).float().mean()), 3)
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------
# CLIP's own pretraining, in miniature
# --------------------------------------------------------------------------------------------------

CLIP_PROMPT = "a photo of a {c} {s} in the {p} corner"  # CLIP-style English captions


def clip_image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIPModel's image embeddings (before normalising), with the last layer computed for the class token alone.

    The contrastive loss reads the last layer at the class token only, so the other tokens' queries, attention
    outputs and MLPs there are wasted work (a quarter of the tower's, with 3 layers); this computes what
    `model.get_image_features` does for the class token, without them (tests/demo/test_prepare.py compares the
    loss, every gradient and the embeddings with CLIPModel's own forward).
    """
    vision = model.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    *layers, last = vision.encoder.layers
    for layer in layers:
        hidden = layer(hidden, None)
    attention = last.self_attn
    batch, _, width = hidden.shape
    normed = last.layer_norm1(hidden)

    def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, width] -> [B, heads, T, head_dim]
        return x.view(batch, x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    query = heads(attention.q_proj(normed[:, :1]))
    weights = (query @ heads(attention.k_proj(normed)).transpose(-1, -2) * attention.scale).softmax(-1)
    mixed = (weights @ heads(attention.v_proj(normed))).transpose(1, 2).reshape(batch, 1, width)
    cls = hidden[:, :1] + attention.out_proj(mixed)
    cls = cls + last.mlp(last.layer_norm2(cls))
    return model.visual_projection(vision.post_layernorm(cls[:, 0]))


def clip_loss(model: CLIPModel, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss of `model(input_ids=..., pixel_values=..., return_loss=True)`, the image
    side through `clip_image_embeds` (row i of each is a matching pair)."""
    image = clip_image_embeds(model, pixel_values)
    text = model.text_projection(model.text_model(input_ids=input_ids).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = text @ image.t() * model.logit_scale.exp()
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain_clip(clip_dir: Path, demo: DemoConfig, log_every: int = 50) -> list[float]:
    """Contrastive image-text training of the tiny CLIP (both towers), then saved over its weights.

    The real tower (openai/clip-vit-large-patch14) was trained this way on captioned pictures, which is why
    its patch features tell a circle from a triangle; a random tower's barely do (DEMO-NOTES.md). The
    pictures are drawn here, in memory, from their own random streams ([seed, 100, k]): none of them is a
    VLM training or held-out image. Each batch holds distinct captions (CLIP's loss treats every other
    caption of the batch as a negative). The text tower reads word ids in the official layout: start and
    end of text are the last two ids, and the end of text, the largest id, is where CLIP pools.
    """
    model = CLIPModel.from_pretrained(clip_dir)
    processor = ImagePreprocessor.from_pretrained(clip_dir)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=demo.clip_pretrain_learning_rate, weight_decay=0.0, fused=True)
    warmup = max(demo.clip_pretrain_steps // 20, 1)  # then constant: the loss drops late (docs/DEMO.md)
    model.train()
    losses, started = [], time.time()
    for step in range(demo.clip_pretrain_steps):
        chosen = torch.from_numpy(rng.permutation(len(items))[:batch])
        picture = chosen * n + torch.from_numpy(rng.integers(0, n, size=batch))
        for group in optimizer.param_groups:
            group["lr"] = demo.clip_pretrain_learning_rate * min(1.0, (step + 1) / warmup)
        loss = clip_loss(model, text_ids[chosen], pixels[picture])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  CLIP pretraining step {step + 1}/{demo.clip_pretrain_steps}  loss {loss.item():.3f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(tensors, clip_dir / "model.safetensors")
    return losses
