"""inference: conversations with images against the training encoding, streaming with a stop, <image> marks,
finding checkpoints; infer.py --stream on the shared stream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dataset.conversation import IGNORE_INDEX, encode_conversation
from inference import (
    Prompt,
    Turn,
    chat_prompt,
    find_checkpoint,
    fit_history,
    generate_answers,
    load_checkpoint,
)
from inference import query_with_images as make_query
from inference.generation import prompt_tensors

TAG = "<image>"  # the image marker of prompts (dataprocess.schema.IMAGE_MARKER)
ROOT = Path(__file__).resolve().parents[2]


def picture(colour, corner=0, size=64):
    image = Image.new("RGB", (size, size), (235, 230, 220))
    x, y = (corner % 2) * size // 2, (corner // 2) * size // 2
    ImageDraw.Draw(image).ellipse([x + 4, y + 4, x + size // 2 - 4, y + size // 2 - 4], fill=colour)
    return image


@pytest.fixture(scope="module")
def answerer(tiny_bundle_dir):
    return load_checkpoint(tiny_bundle_dir, device="cpu")


def expected_answer(answerer, prompt, **gen):
    return generate_answers(answerer.model, answerer.tokenizer, answerer.processor, [prompt],
                            system=answerer.config.system_prompt,
                            num_image_tokens=answerer.config.vision.num_image_tokens, **gen)[0]


def test_make_query_places_one_tag_per_image():
    assert make_query("What is it?", 2) == f"{TAG}\n{TAG}\nWhat is it?"
    assert make_query("Is <image> darker than <image>?", 2) == "Is <image> darker than <image>?"
    assert make_query("Hello", 0) == "Hello"
    with pytest.raises(ValueError, match=r"2 <image> mark\(s\) but 1 image\(s\)"):
        make_query("<image> or <image>", 1)
    # the LLM's own image token typed by a user is text (encoded as text), not an image slot
    assert make_query("typed <|extra_0|>", 1) == "<image>\ntyped <|extra_0|>"


def test_conversation_prompt_is_the_training_encoding_with_images_in_order(answerer):
    """The prompt of a third question, after a turn with two images (one in the middle of the text) and a turn
    without, is exactly the training sequence of the same conversation up to the third answer; the pixels are
    the three images in the order of their tags."""
    tok, proc, n = answerer.tokenizer, answerer.processor, answerer.config.vision.num_image_tokens
    a, b, c = picture((215, 30, 30), 0), picture((35, 65, 215), 3), picture((30, 150, 45), 1)
    history = [
        Turn(make_query("Compare <image> with <image>, please.", 2), [a, b], "The first one is red."),
        Turn(make_query("Which is larger?", 0), [], "Neither."),
    ]
    query = make_query("And this one?", 1)
    ids, mask, pixels = prompt_tensors([chat_prompt(query, [c], history)], tok, proc, "You are a test.", n)

    turns = []
    for user, answer in [(t.query, t.answer) for t in history] + [(query, "Green.")]:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    training = encode_conversation(tok, turns, system="You are a test.", num_image_tokens=n, max_length=None)
    length = ids.shape[1]
    assert ids[0].tolist() == training.input_ids[:length]
    # the prompt ends exactly where the supervised third answer begins
    assert training.labels[length - 1] == IGNORE_INDEX and training.labels[length] != IGNORE_INDEX
    assert training.input_ids[length:] == tok.encode("Green.", allowed_special=set()) + [tok.im_end_id]
    assert mask.all() and training.num_images == 3
    assert ids[0].tolist().count(tok.image_token_id) == 3 * n
    torch.testing.assert_close(pixels, proc([a, b, c]), atol=0, rtol=0)


def test_the_answer_depends_on_the_earlier_turns_images(answerer):
    """Not vacuous: the same follow-up after a turn with another picture gets another answer."""
    follow_up = make_query("Where is it?", 0)
    answers = {
        colour: expected_answer(answerer, chat_prompt(
            follow_up, [], [Turn(make_query("What colour?", 1), [picture(colour, 2)], "I see it.")]),
            max_new_tokens=8)
        for colour in [(215, 30, 30), (35, 65, 215)]
    }
    assert len(set(answers.values())) == 2, answers


def test_fit_history_drops_whole_oldest_turns(answerer):
    tok, n = answerer.tokenizer, answerer.config.vision.num_image_tokens
    history = [Turn(make_query(f"Question {i} about this?", 1), [picture((200, 20 * i, 30))], f"Answer {i}.")
               for i in range(4)]
    query = make_query("Last question?", 0)
    lengths = [len(prompt_tensors([chat_prompt(query, [], history[k:])], tok, answerer.processor, "S", n)[0][0])
               for k in range(5)]
    assert lengths == sorted(lengths, reverse=True)
    window = lengths[2]  # room for the two newest turns exactly
    kept = fit_history(tok, query, history, system="S", num_image_tokens=n, max_window_size=window)
    assert kept == history[2:]
    assert fit_history(tok, query, history, system="S", num_image_tokens=n, max_window_size=window - 1) == history[3:]
    assert fit_history(tok, query, history, system="S", num_image_tokens=n, max_window_size=10**6) == history
    assert fit_history(tok, query, history, system="S", num_image_tokens=n, max_window_size=1) == []


def test_stream_grows_to_exactly_the_answer_of_generate_answers(answerer):
    prompt = chat_prompt(make_query("What colour is the shape?", 1), [picture((215, 30, 30))])
    expected = expected_answer(answerer, prompt, max_new_tokens=40)
    streamed = list(answerer.stream(prompt, system=None, max_new_tokens=40))
    assert streamed[-1] == expected
    assert len(streamed) >= 3, streamed  # the answer arrived in pieces
    for shorter, longer in zip(streamed[:-2], streamed[1:-1]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert streamed[-2].strip() == expected  # the pieces add up to the answer (which is stripped)


def test_a_set_stop_event_ends_generation_after_one_token(answerer):
    prompt = chat_prompt(make_query("What colour is the shape?", 1), [picture((35, 65, 215))])
    stop = threading.Event()
    stop.set()
    stopped = list(answerer.stream(prompt, system=None, stop=stop, max_new_tokens=40))[-1]
    assert stopped == expected_answer(answerer, prompt, max_new_tokens=1)
    assert len(expected_answer(answerer, prompt, max_new_tokens=40)) > len(stopped)


def test_closing_the_stream_early_stops_the_generation_thread(answerer):
    prompt = chat_prompt(make_query("What colour is the shape?", 1), [picture((35, 65, 215))])
    stop = threading.Event()
    stream = answerer.stream(prompt, system=None, stop=stop, max_new_tokens=2000)
    next(stream)
    stream.close()
    assert stop.is_set()
    assert not any(t.name == "generate" and t.is_alive() for t in threading.enumerate())


def test_generation_errors_reach_the_caller(answerer):
    with pytest.raises(ValueError, match=r"1 <image> mark\(s\) but 0 image\(s\)"):
        list(answerer.stream(Prompt(f"{TAG}\nHello", []), system=None, max_new_tokens=4))


def test_no_repetition_penalty_unless_asked(answerer):
    """The tiny QWen's generation_config.json says repetition_penalty 1.1, as Qwen-7B-Chat's does; answers
    apply none by default (what the llava export's generation_config.json says too), and a penalty on request."""
    assert answerer.model.generation_config.repetition_penalty == 1.1
    prompts = [Prompt(make_query(q, 1), [picture(c, k)]) for q, c, k in
               (("What is it?", (215, 30, 30), 0), ("Describe it.", (35, 65, 215), 3), ("颜色？", (30, 150, 45), 1))]

    def answers(**gen):
        return answerer.generate(prompts, max_new_tokens=24, **gen)

    default = answers()
    assert default == answers(repetition_penalty=1.0)
    assert default != answers(repetition_penalty=1.1)


def test_find_checkpoint_takes_the_newest_bundle_or_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no trained checkpoint found under .*outputs/ \(run `bash train.sh`"):
        find_checkpoint(None, tmp_path / "outputs")
    older, newer = tmp_path / "outputs" / "a" / "checkpoint-5", tmp_path / "outputs" / "b"
    for folder, stamp in ((newer, 2_000_000_000), (older, 1_000_000_000)):
        folder.mkdir(parents=True)
        (folder / "vlm_config.json").write_text("{}")
        os.utime(folder / "vlm_config.json", (stamp, stamp))
    assert find_checkpoint(None, tmp_path / "outputs") == newer
    assert find_checkpoint(older) == older
    with pytest.raises(FileNotFoundError, match=r"not a checkpoint folder \(no vlm_config.json\)"):
        find_checkpoint(tmp_path)


def test_infer_stream_prints_the_answer_of_generate_answers(answerer, tiny_bundle_dir, tmp_path):
    image = tmp_path / "red.png"
    picture((215, 30, 30)).save(image)
    from visual import load_image

    expected = expected_answer(answerer, Prompt(f"{TAG}\nWhat colour is the shape?", [load_image(image)]),
                               max_new_tokens=16)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "infer.py", "--checkpoint", str(tiny_bundle_dir), "--image", str(image), "--prompt",
         "What colour is the shape?", "--max-new-tokens", "16", "--stream", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith("\n") and result.stdout[:-1].strip() == expected, (result.stdout, expected)


def test_the_allowed_token_mask_sets_minus_infinity_outside_and_keeps_every_other_score():
    # In place on generate's per-step copy of the logits, with the mask made once per width: each step's scores
    # are exactly the out-of-place masking's, also for a vocabulary narrower than the mask (an export's logits).
    from inference.generation import AllowedTokens

    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[0, 3, 7]] = True
    processor = AllowedTokens(allowed)
    for width in (10, 8, 10):
        scores = torch.randn(3, width)
        expected = torch.where(allowed[:width], scores, torch.tensor(float("-inf")))
        out = processor(torch.zeros(3, 1, dtype=torch.long), scores.clone())
        assert torch.equal(out, expected)
    assert len(processor._disallowed) == 2
