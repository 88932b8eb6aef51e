"""The demo's preparation: the tiny CLIP's contrastive pretraining, the tiny vocabulary's answer words and the tiny
QWen's text pretraining over a compact vocabulary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

from demo.pretrain import clip_image_embeds, clip_loss, pretrain_clip, vocab_corpus
from qwen import QWenTokenizer
from qwen.tiny_vocab import write_tiny_vocab
from settings import DemoConfig
from visual import ImagePreprocessor, write_tiny_clip_checkpoint
from visual.clip_tower import CLIPVisionTower


def test_every_answer_word_is_one_token(tmp_path: Path):
    """Like the real vocabulary, the demo's has the answer words whole: one 151936-way softmax per word."""
    from demo.synthetic import ATTRIBUTES

    tokenizer = QWenTokenizer(write_tiny_vocab(tmp_path / "qwen.tiktoken", vocab_size=1024, corpus=vocab_corpus()))
    for vocab in ATTRIBUTES.values():
        for word in vocab.values():
            for text in (word.en.split()[0], word.zh):  # "top left" is two words, "左上" one
                assert len(tokenizer.encode(text)) == 1, (text, tokenizer.encode(text))
    for word in ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "top",
                 "bottom", "left", "right"]:
        assert len(tokenizer.encode(" " + word)) == 1, word  # inside a sentence too
    for word in ["颜色", "形状", "位置", "图片", "这", "是", "什么"]:
        assert len(tokenizer.encode(word)) == 1, word


def test_clip_pretraining_learns_and_keeps_the_official_layout(tmp_path: Path):
    clip_dir = tmp_path / "clip"
    write_tiny_clip_checkpoint(clip_dir, image_size=56, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               seed=0, position_embedding_scale=12.0)
    before = load_file(clip_dir / "model.safetensors")
    config_before = json.loads((clip_dir / "config.json").read_text())
    demo = DemoConfig(image_size=56, clip_pretrain_steps=60, clip_pretrain_images_per_caption=2,
                      clip_pretrain_learning_rate=3e-3)

    losses = pretrain_clip(clip_dir, demo, log_every=1000)

    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5  # 64-way contrastive loss starts near ln 64 = 4.2
    after = load_file(clip_dir / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    assert json.loads((clip_dir / "config.json").read_text()) == config_before
    assert not torch.equal(after["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                           before["vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert not list(clip_dir.glob("*.partial"))

    # The project's strict loader reads the trained weights: its features are those of transformers' own
    # CLIPVisionModel given the saved vision weights by name.
    tower = CLIPVisionTower.from_pretrained(clip_dir, feature_layer=-2)
    pixels = ImagePreprocessor.from_pretrained(clip_dir)([Image.new("RGB", (56, 56), (200, 30, 30))])
    reference = CLIPVisionModel(CLIPVisionConfig(**config_before["vision_config"])).eval()
    prefix = "vision_model."
    reference.load_state_dict({k[len(prefix):]: v for k, v in after.items() if k.startswith(prefix)})
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)


def test_clip_loss_with_the_class_token_alone_in_the_last_layer_is_clips_own(tmp_path: Path):
    # The tower's pretraining computes its last layer for the class token only (what the loss reads): the loss,
    # every gradient and the image embeddings must be those of CLIPModel's own forward (float64: equal up to
    # summation order).
    write_tiny_clip_checkpoint(tmp_path / "clip", image_size=56, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, seed=0, position_embedding_scale=16.0)
    model = CLIPModel.from_pretrained(tmp_path / "clip").double()
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 56, 56, dtype=torch.float64)
    vocab = model.config.text_config.vocab_size
    input_ids = torch.cat([torch.full((6, 1), vocab - 2), torch.randint(1, 40, (6, 7)), torch.full((6, 1), vocab - 1)],
                          dim=1)
    params = list(model.parameters())

    reference = model(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss
    expected = torch.autograd.grad(reference, params, allow_unused=True)
    ours = clip_loss(model, input_ids, pixels)
    got = torch.autograd.grad(ours, params, allow_unused=True)

    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    for (name, _), e, g in zip(model.named_parameters(), expected, got):
        assert (e is None) == (g is None), name
        if e is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(clip_image_embeds(model, pixels),
                                   model.get_image_features(pixel_values=pixels).pooler_output, rtol=0, atol=1e-12)
    assert sum(e is not None and bool(e.abs().sum() > 0) for e in expected) > 50  # real gradients were compared


def test_compact_text_pretraining_is_the_full_size_model(tmp_path: Path):
    """The text pretraining runs on the ~1,030 ids the demo's text uses; the checkpoint it gives (official
    151,936 rows) has exactly the loss and the greedy answers of the compact model it was trained as."""
    from demo.pretrain import pretrain_text, text_accuracy, text_batch, text_vocab
    from qwen import QWenConfig, QWenLMHeadModel
    from qwen.tiny import QWEN_VOCAB_SIZE, random_qwen_state_dict, tiny_qwen_config

    tokenizer = QWenTokenizer(write_tiny_vocab(tmp_path / "qwen.tiktoken", vocab_size=400, corpus=vocab_corpus()))
    fields = tiny_qwen_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    initial = random_qwen_state_dict(fields, seed=3)
    demo = DemoConfig(seed=3, pretrain_steps=12, pretrain_batch_size=8, pretrain_learning_rate=1e-2)
    trained, losses, _ = pretrain_text(initial, fields, tokenizer, demo, log_every=1000)

    assert len(losses) == 12 and losses[-1] < losses[0]
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert trained["lm_head.weight"].shape[0] == QWEN_VOCAB_SIZE
    vocab = text_vocab(tokenizer, QWEN_VOCAB_SIZE)
    used = torch.zeros(QWEN_VOCAB_SIZE, dtype=torch.bool)
    used[vocab.used] = True
    assert used.sum() == 400 + 3  # the BPE ranks and <|endoftext|>, <|im_start|>, <|im_end|>
    wte, head = trained["transformer.wte.weight"], trained["lm_head.weight"]
    assert torch.equal(wte[~used], initial["transformer.wte.weight"][~used])  # never read: untouched
    assert not torch.equal(wte[used], initial["transformer.wte.weight"][used])
    rest = head[~used]
    assert torch.equal(rest, rest[:1].expand_as(rest)) and rest.abs().sum() > 0  # one trained row for all unused ids

    full = QWenLMHeadModel(QWenConfig(**fields)).eval()
    full.load_state_dict(trained)
    compact = QWenLMHeadModel(QWenConfig(**{**fields, "vocab_size": vocab.size})).eval()
    compact.load_state_dict(vocab.shrink(trained), strict=False)  # shrink puts a zero rest row: set the trained one
    vocab.install_head(compact)
    with torch.no_grad():
        compact.lm_head.weight[vocab.rest] = rest[0]
    input_ids, labels = text_batch(tokenizer, np.random.default_rng(0), 6)
    with torch.no_grad():
        full_loss = full(input_ids=input_ids, labels=labels, return_logits=False).loss
        compact_loss = compact(input_ids=vocab.compact_ids(input_ids), labels=vocab.compact_ids(labels),
                               return_logits=False).loss
    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert text_accuracy(compact, tokenizer, seed=0, n_per_kind=4, vocab=vocab) == \
        text_accuracy(full, tokenizer, seed=0, n_per_kind=4)


def test_text_batches_draw_and_pad_like_the_plain_code():
    """The text pretraining's fast paths give what the plain code gives: `random_item` the picks (and leaves the
    random stream where) `rng.choice` on each label list does, `pad_batch` right padding with -100 labels."""
    from demo.pretrain import pad_batch, random_item
    from demo.synthetic import COLOURS, POSITIONS, SHAPES, Item

    for seed in range(3):
        fast, plain = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(300):
            assert random_item(fast) == Item(plain.choice(list(COLOURS)), plain.choice(list(SHAPES)),
                                             plain.choice(list(POSITIONS)))
        assert fast.integers(1 << 30) == plain.integers(1 << 30)
    input_ids, labels = pad_batch([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_compact_vocab_maps_ids_and_refuses_unused_ones():
    from demo.compact_vocab import CompactVocab

    vocab = CompactVocab([7, 2, 9, 2], full_size=12)
    assert vocab.size == 4 and vocab.n_rest == 9
    assert vocab.compact_ids(torch.tensor([[2, 7, 9, -100]])).tolist() == [[0, 1, 2, -100]]
    with pytest.raises(ValueError, match=r"outside the compact vocabulary: \[3\]"):
        vocab.compact_ids(torch.tensor([2, 3]))
    full = {"transformer.wte.weight": torch.arange(24.0).view(12, 2), "lm_head.weight": -torch.arange(24.0).view(12, 2)}
    small = vocab.shrink(full)
    assert small["lm_head.weight"].tolist() == [[-4.0, -5.0], [-14.0, -15.0], [-18.0, -19.0], [0.0, 0.0]]
    small["lm_head.weight"][3] = torch.tensor([1.0, 2.0])
    back = vocab.expand(small, full)
    assert torch.equal(back["transformer.wte.weight"], full["transformer.wte.weight"])
    expected_head = torch.tensor([[1.0, 2.0]]).repeat(12, 1)
    expected_head[[2, 7, 9]] = full["lm_head.weight"][[2, 7, 9]]
    assert torch.equal(back["lm_head.weight"], expected_head)


def tiny_demo(work: Path, **changes) -> DemoConfig:
    return DemoConfig(workdir=str(work), seed=2, image_size=56, n_train_images=3, n_caption_images=2,
                      n_heldout_images=2, qwen={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 64},
                      clip={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64, "patch_size": 14, "position_embedding_scale": 12.0},
                      pretrain_steps=3, pretrain_batch_size=4, clip_pretrain_steps=3, clip_pretrain_batch_size=8,
                      clip_pretrain_images_per_caption=1, **changes)


def folder_contents(root: Path) -> dict:
    """{relative path: tensors (safetensors) or bytes}, every file under `root`."""
    return {str(p.relative_to(root)): load_file(p) if p.suffix == ".safetensors" else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_files(a: Path, b: Path) -> None:
    left, right = folder_contents(a), folder_contents(b)
    assert left.keys() == right.keys()
    for name, value in left.items():
        if isinstance(value, dict):
            assert value.keys() == right[name].keys(), name
            assert all(torch.equal(value[k], right[name][k]) for k in value), name
        else:
            assert value == right[name], name


def test_prepare_builds_in_two_processes_what_one_process_builds(tmp_path: Path):
    # prepare() pretrains the tower here while a second process builds the tiny QWen and the data: the models and
    # files must be those of the same steps run one after the other in one process, on the same thread counts
    # (the numbers of a matrix product depend on how many threads share it), and a second run must repeat them.
    from demo.prepare import build_qwen_and_data, prepare, thread_shares

    demo = tiny_demo(tmp_path / "two")
    cores = torch.get_num_threads()
    prepare(demo)
    assert torch.get_num_threads() == cores  # restored after the tower's pretraining on its share of the cores
    one = tmp_path / "one"
    one.mkdir()
    tower_threads, text_threads = thread_shares(cores)
    try:
        torch.set_num_threads(text_threads)
        torch.manual_seed(demo.seed)
        report = build_qwen_and_data(demo, one)
        torch.set_num_threads(tower_threads)
        torch.manual_seed(demo.seed)
        write_tiny_clip_checkpoint(one / "tiny-clip", image_size=demo.image_size, seed=demo.seed, **demo.clip)
        pretrain_clip(one / "tiny-clip", demo, log_every=1000)
    finally:
        torch.set_num_threads(cores)
    for part in ("tiny-clip", "tiny-qwen", "raw"):
        assert_same_files(tmp_path / "two" / part, one / part)
    written = json.loads((tmp_path / "two" / "prepare_report.json").read_text())
    assert written["text_accuracy"] == report["text_accuracy"]
    assert written["text_final_loss"] == report["text_final_loss"]
    assert set(written["seconds"]) == {"clip", "images", "qwen"}

    again = tiny_demo(tmp_path / "again")
    prepare(again)
    for part in ("tiny-clip", "tiny-qwen", "raw"):
        assert_same_files(tmp_path / "two" / part, tmp_path / "again" / part)


def test_a_failure_in_the_second_process_is_one_error_and_leaves_no_stamp(tmp_path: Path, capfd):
    from demo.prepare import STAMP, main

    work = tmp_path / "work"
    fields = dataclasses.asdict(tiny_demo(work, vocab_size=200))  # too few ranks for the bytes
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"demo": fields}))  # JSON is YAML
    threads = torch.get_num_threads()
    assert main(["--config", str(config)]) == 1
    assert torch.get_num_threads() == threads
    err = capfd.readouterr().err  # file descriptor 2: the second process's traceback too, then the one-line error
    assert "Traceback (most recent call last)" in err and "in build_qwen_and_data" in err, err
    last = err.strip().splitlines()[-1]
    assert last == ("demo.prepare: error: building the tiny QWen and the data failed: ValueError: vocab_size must "
                    "be at least 256 (the single bytes), got 200"), err
    assert not (work / STAMP).exists()
