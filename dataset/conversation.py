"""Conversations → token ids in the ChatML layout of the Qwen models (v1, 2.5, 3), with image placeholders and an
exact label mask. Any tokenizer with the chat-tokenizer interface (llm/base.py) works.

A training sequence with a system message and two (user, assistant) turns reads:

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{user 1}<|im_end|>\\n<|im_start|>assistant\\n⟦{answer 1}<|im_end|>⟧
    \\n<|im_start|>user\\n{user 2}<|im_end|>\\n<|im_start|>assistant\\n⟦{answer 2}<|im_end|>⟧

(each "\\n" drawn is the only one). Labels are -100 everywhere except inside ⟦…⟧: every answer's
tokens and its closing `<|im_end|>`, the token that teaches the model to stop. The prefix up to
each answer is exactly the inference prompt (`build_prompt_ids`, equal to `qwen.make_context` for
text without images), so training and inference see the same tokens.

Images: each `<image>` marker (dataprocess.schema.IMAGE_MARKER) in a USER turn becomes `num_image_tokens`
copies of the LLM's own image token id (`tokenizer.image_token_id`: `<|extra_0|>` for QWen v1, `<|image_pad|>`
for Qwen2.5 / Qwen3; the placeholders the model overwrites with projected image features). All text - system,
user, answers - is encoded with `tokenizer.encode_text`, so text that looks like a special token ("<|im_end|>",
"<|image_pad|>" in an answer) stays ordinary text; special ids are only ever inserted here, by structure.
`check_encoding` re-derives the mask from the ids alone and raises on any disagreement.

Too long for `max_length`: whole trailing (user, assistant) pairs are dropped, with their images,
so a placeholder run is never cut and no tag loses its image; if the first pair alone does not fit,
`SampleTooLongError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dataprocess.schema import ASSISTANT, IMAGE_MARKER, USER, check_turns
from llm import ChatTokenizer

IGNORE_INDEX = -100  # label of every token that is not supervised
SYSTEM = "system"


class SampleTooLongError(Exception):
    """Even the first (user, assistant) pair of a conversation does not fit in max_length.
    Not a ValueError on purpose: an unusable sample is counted, an inconsistent one is a bug."""

    def __init__(self, sample_id: str, length: int, max_length: int):
        self.sample_id = sample_id
        self.length = length
        self.max_length = max_length
        super().__init__(f"{sample_id}: the first turn pair alone is {length} tokens, over max_length={max_length}")


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX except answer tokens and their <|im_end|>
    num_images: int  # images whose tags were kept: the first num_images of the sample's images
    dropped_turns: int  # entries of `turns` dropped to fit max_length (whole pairs: always even)


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Ids of text that must stay text: special-token look-alikes are encoded as ordinary characters."""
    return tokenizer.encode_text(text)


def encode_user_text(tokenizer: ChatTokenizer, text: str, num_image_tokens: int) -> list[int]:
    """A user message: the text between markers encoded as text, each marker as num_image_tokens placeholder ids.

    With no marker this is exactly `tokenizer.encode_text(text)`. The text is split at the markers before
    encoding, so BPE never merges across an image.
    """
    pieces = text.split(IMAGE_MARKER)
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    image_run = [tokenizer.image_token_id] * num_image_tokens
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids += image_run
        if piece:
            ids += encode_text(tokenizer, piece)
    return ids


class _Layout:
    """The fixed ChatML pieces of one tokenizer (encoded once per tokenizer: see `_layout`)."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.nl = encode_text(tokenizer, "\n")
        start, end = tokenizer.im_start_id, tokenizer.im_end_id
        self.end = [end]
        self.special = tokenizer.special_ids  # never in text
        # <|im_start|>{role}\n for each role
        self.heads = {role: [start, *encode_text(tokenizer, role), *self.nl] for role in (SYSTEM, USER, ASSISTANT)}
        self.system_head = self.heads[SYSTEM]
        self.user_head = self.nl + self.heads[USER]  # \n<|im_start|>user\n
        # <|im_end|>\n<|im_start|>assistant\n : closes the user message and opens the answer
        self.assistant_head = [end, *self.nl, *self.heads[ASSISTANT]]


@functools.lru_cache(maxsize=8)
def _layout(tokenizer: ChatTokenizer) -> _Layout:
    return _Layout(tokenizer)


def _system_ids(tokenizer: ChatTokenizer, layout: _Layout, system: str) -> list[int]:
    return layout.system_head + encode_text(tokenizer, system) + layout.end


# --------------------------------------------------------------------------------------------------
# Inference prompt
# --------------------------------------------------------------------------------------------------


def build_prompt_ids(
    tokenizer: ChatTokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None,
    system: str,
    num_image_tokens: int,
    *,
    max_window_size: int | None = None,
) -> list[int]:
    """The prompt that asks for the answer to `query` after `history` [(query, answer), ...].

    Qwen-7B-Chat's ChatML layout, ending with "<|im_start|>assistant\\n"; image tags in the queries
    (history included) are expanded to placeholders. Without tags, the ids equal
    `qwen.make_context(tokenizer, query, history, system, max_window_size=...)[1]`.

    max_window_size=None keeps the whole history. An integer applies make_context's rule: history
    pairs are kept from the newest back while system + kept pairs stay under it. Images of dropped
    pairs are gone: the prompt then holds the LAST `placeholders // num_image_tokens` images.
    """
    layout = _layout(tokenizer)
    system_ids = _system_ids(tokenizer, layout, system)
    pairs: list[int] = []
    for turn_query, turn_answer in reversed(list(history or [])):
        pair = (
            layout.user_head
            + encode_user_text(tokenizer, turn_query, num_image_tokens)
            + layout.assistant_head
            + encode_text(tokenizer, turn_answer)
            + layout.end
        )
        if max_window_size is not None and len(system_ids) + len(pair) + len(pairs) >= max_window_size:
            break
        pairs = pair + pairs
    return (
        system_ids
        + pairs
        + layout.user_head
        + encode_user_text(tokenizer, query, num_image_tokens)
        + layout.assistant_head
    )


# --------------------------------------------------------------------------------------------------
# Training sequence
# --------------------------------------------------------------------------------------------------


def encode_conversation(
    tokenizer: ChatTokenizer,
    turns: Sequence[dict[str, Any]],
    *,
    system: str,
    num_image_tokens: int,
    max_length: int | None,
    sample_id: str = "<conversation>",
) -> EncodedConversation:
    """The training sequence of `turns` ([{"role", "content"}, ...], user first, answer last) and its labels.

    The label mask comes from the spans built here while concatenating, and is then checked against
    the ids by `check_encoding` (ValueError naming `sample_id` on any inconsistency). Trailing pairs
    that do not fit max_length are dropped (see the module docstring); SampleTooLongError if none fits.
    """
    check_turns(turns, sample_id)
    layout = _layout(tokenizer)
    input_ids = _system_ids(tokenizer, layout, system)
    labels = [IGNORE_INDEX] * len(input_ids)
    num_images = 0
    num_pairs = len(turns) // 2
    kept = 0
    for k in range(num_pairs):
        user, answer = turns[2 * k]["content"], turns[2 * k + 1]["content"]
        prompt = layout.user_head + encode_user_text(tokenizer, user, num_image_tokens) + layout.assistant_head
        supervised = encode_text(tokenizer, answer) + layout.end
        if max_length is not None and len(input_ids) + len(prompt) + len(supervised) > max_length:
            if k == 0:
                raise SampleTooLongError(sample_id, len(input_ids) + len(prompt) + len(supervised), max_length)
            break
        input_ids += prompt + supervised
        labels += [IGNORE_INDEX] * len(prompt) + supervised
        num_images += user.count(IMAGE_MARKER)
        kept += 1
    check_encoding(
        tokenizer, input_ids, labels,
        num_images=num_images, num_answers=kept, num_image_tokens=num_image_tokens, sample_id=sample_id,
    )
    return EncodedConversation(input_ids, labels, num_images, dropped_turns=2 * (num_pairs - kept))


# --------------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------------


def check_encoding(
    tokenizer: ChatTokenizer,
    input_ids: Sequence[int],
    labels: Sequence[int],
    *,
    num_images: int,
    num_answers: int,
    num_image_tokens: int,
    sample_id: str = "<conversation>",
) -> None:
    """Re-derive from the ids alone what must be supervised and where images are; raise ValueError on a mismatch.

    - the ids are system + num_answers (user, assistant) messages: that many <|im_start|>/<|im_end|>
      pairs, properly nested, with no other special id except placeholders;
    - labels equal the ids exactly on each "<|im_start|>assistant\\n" message's content and closing
      <|im_end|>, and are IGNORE_INDEX everywhere else (no placeholder is ever supervised);
    - placeholders appear only inside user messages, in runs whose lengths are multiples of
      num_image_tokens (adjacent tags make one long run), num_images images in all.
    """

    def fail(what: str) -> None:
        raise ValueError(f"{sample_id}: inconsistent encoding: {what}")

    if num_image_tokens < 1:
        fail(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    ids = input_ids if isinstance(input_ids, list) else list(input_ids)
    labels = labels if isinstance(labels, list) else list(labels)
    if len(ids) != len(labels):
        fail(f"{len(ids)} ids but {len(labels)} labels")
    layout = _layout(tokenizer)

    images = 0
    pos = 0
    for m, role in enumerate([SYSTEM] + [USER, ASSISTANT] * num_answers):
        head = (layout.nl if m else []) + layout.heads[role]
        if ids[pos:pos + len(head)] != head:
            fail(f"message {m} at {pos} should open with <|im_start|>{role} (after a newline unless first)")
        if labels[pos:pos + len(head)].count(IGNORE_INDEX) != len(head):
            fail(f"the header of message {m} ({role}) at {pos} is supervised")
        pos += len(head)
        try:
            close = ids.index(tokenizer.im_end_id, pos)
        except ValueError:
            fail(f"message {m} ({role}) at {pos} is not closed by <|im_end|>")
        images += _check_content(ids[pos:close], role, tokenizer.image_token_id, num_image_tokens, layout.special,
                                 lambda what, m=m, role=role: fail(f"message {m} ({role}): {what}"))
        if role == ASSISTANT:
            if labels[pos:close + 1] != ids[pos:close + 1]:
                fail(f"the answer of message {m} at {pos}..{close} is not supervised exactly")
        elif labels[pos:close + 1].count(IGNORE_INDEX) != close + 1 - pos:
            fail(f"message {m} ({role}) at {pos}..{close} is supervised")
        pos = close + 1
    if pos != len(ids):
        fail(f"{len(ids) - pos} tokens after the last message (expected {num_answers} turn pairs)")
    if images != num_images:
        fail(f"{images} images' worth of placeholders, expected {num_images} (tags kept)")


def _check_content(content: list[int], role: str, image: int, num_image_tokens: int, special: frozenset[int],
                   fail: Callable[[str], None]) -> int:
    """Images in one message's content. Text between images has no special id; placeholders come
    only in user messages, in whole runs of num_image_tokens (several adjacent images: one long run)."""
    full_run = [image] * num_image_tokens
    images = 0
    pos = 0
    while True:
        try:
            run = content.index(image, pos)
        except ValueError:
            run = len(content)
        text = content[pos:run]
        if not special.isdisjoint(text):
            fail(f"special id {next(t for t in text if t in special)} in its text")
        if run == len(content):
            return images
        if role != USER:
            fail(f"an image placeholder at {run} (images belong in user messages)")
        while content[run:run + num_image_tokens] == full_run:
            images += 1
            run += num_image_tokens
        if run < len(content) and content[run] == image:
            fail(f"placeholders at {run} do not make a whole run of {num_image_tokens}")
        pos = run
