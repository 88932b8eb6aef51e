"""Qwen-7B-Chat's prompt format (ChatML), as built by the official `make_context`.

A prompt with a system message, one earlier turn and a new query reads:

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{query 1}<|im_end|>\\n<|im_start|>assistant\\n{response 1}<|im_end|>
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

(without the line breaks drawn here: every "\\n" shown is the only one). `<|im_start|>` and
`<|im_end|>` are inserted as ids; roles and contents are encoded with `allowed_special=set()`,
so text such as "<|im_start|>" typed by a user stays ordinary text.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen.tokenization_qwen import IM_END, IM_START, QWenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen-7B-Chat's default system prompt
DEFAULT_MAX_WINDOW_SIZE = 6144  # Qwen-7B-Chat's generation_config.json

History = Sequence[tuple[str, str]]


def _message(tokenizer: QWenTokenizer, role: str, content: str) -> tuple[str, list[int]]:
    """`<|im_start|>{role}\\n{content}<|im_end|>` as text and ids; role and content never become special ids."""
    ids = (
        [tokenizer.im_start_id]
        + tokenizer.encode(role, allowed_special=set())
        + tokenizer.encode("\n")
        + tokenizer.encode(content, allowed_special=set())
        + [tokenizer.im_end_id]
    )
    return f"{IM_START}{role}\n{content}{IM_END}", ids


def make_context(
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt for `query` after `history` [(query, response), ...]: returns (raw_text, token ids).

    History turns are added from the newest back and kept while system + kept turns + the turn stay
    under max_window_size tokens (strictly less); the first turn that does not fit drops itself and
    every older one. The system message and the query are always kept, whatever their length.
    chat_format is in the official signature; only "chatml" (Qwen-7B-Chat's) is built, any other is a ValueError.
    """
    if chat_format != "chatml":
        raise ValueError(f"unknown chat format {chat_format!r}; only 'chatml' is supported")

    nl = tokenizer.encode("\n")
    system_text, system_ids = _message(tokenizer, "system", system)

    turns_text = ""
    turns_ids: list[int] = []
    for turn_query, turn_response in reversed(list(history or [])):
        user_text, user_ids = _message(tokenizer, "user", turn_query)
        bot_text, bot_ids = _message(tokenizer, "assistant", turn_response)
        turn_ids = nl + user_ids + nl + bot_ids
        if len(system_ids) + len(turn_ids) + len(turns_ids) >= max_window_size:
            break
        turns_ids = turn_ids + turns_ids
        turns_text = f"\n{user_text}\n{bot_text}" + turns_text

    query_text, query_ids = _message(tokenizer, "user", query)
    # The open assistant header; "assistant" is encoded with the defaults here, as officially (same ids).
    answer_ids = [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    raw_text = f"{system_text}{turns_text}\n{query_text}\n{IM_START}assistant\n"
    ids = system_ids + turns_ids + nl + query_ids + nl + answer_ids
    return raw_text, ids
