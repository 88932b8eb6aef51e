"""The Qwen2 / Qwen2.5 / Qwen3 tokenizer, read from a published folder's `tokenizer.json` with `tokenizers`.

Those folders ship `tokenizer.json` (the fast tokenizer: NFC, Qwen's split pattern, byte-level BPE over the
151,643 ranks that Qwen-7B's `qwen.tiktoken` holds, then added tokens from id 151643), `tokenizer_config.json`
(chat template, eos/pad names) and `vocab.json` + `merges.txt` (the same BPE again). `tokenizer.json` is what
loads here; the other files are not read. transformers' `AutoTokenizer` is not used: it takes seconds to
import and adds behaviours of its own; the ids are tested equal to its ids on the same folder.

Text that must stay text. `encode_text` never produces an added token: "<|im_end|>", "<|image_pad|>" or
"<think>" typed in a message are encoded as the characters they are, and the chat markers are inserted as
ids by whoever builds the prompt. For the added tokens the published file marks special (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, the vision tokens) the ids are exactly transformers'
`tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]`. transformers still
turns the text of the added tokens marked non-special (`<tool_call>`, `<|fim_prefix|>`, Qwen3's `<think>`,
...) into their ids under `split_special_tokens=True`; `encode_text` does not (every added token is treated
as special when encoding).

Decoding is transformers' `decode`: `skip_special_tokens=True` drops the added tokens marked special in the
file and keeps the others (Qwen3's `<think>` stays in the text, as transformers shows it); a character cut
in half by the end of the ids is written U+FFFD.

Qwen2 has no pad token of its own: `<|endoftext|>` pads, so an attention mask comes from lengths, never from
`ids != pad_token_id`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer

from qwen.tokenization_qwen import ENDOFTEXT, IM_END, IM_START, VOCAB_FILE_NAME, to_id_list

TOKENIZER_FILE = "tokenizer.json"
# The LLM's reserved placeholder for one image feature row (Qwen2-VL's own image token), never typed text.
IMAGE_PAD = "<|image_pad|>"
REQUIRED_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE_PAD)


def _all_added_tokens_special(tokenizer_json: dict[str, Any]) -> str:
    """`tokenizer_json` with every added token marked special, as JSON text: with `encode_special_tokens` the
    tokenizer then keeps the text of every added token as ordinary text."""
    encoder_json = dict(tokenizer_json)
    encoder_json["added_tokens"] = [{**token, "special": True} for token in tokenizer_json.get("added_tokens", [])]
    return json.dumps(encoder_json, ensure_ascii=False)


class Qwen2Tokenizer:
    """The tokenizer of a Qwen2 / Qwen2.5 / Qwen3 folder (see the module docstring).

    `Qwen2Tokenizer.from_pretrained(folder)`, or `Qwen2Tokenizer(tokenizer_file)` for a `tokenizer.json`.
    Picklable (DataLoader workers): the Rust tokenizer is rebuilt from the file's text on unpickling.
    """

    def __init__(self, tokenizer_file: str | os.PathLike, name_or_path: str | os.PathLike | None = None):
        tokenizer_file = os.fspath(tokenizer_file)
        self.name_or_path = os.fspath(name_or_path) if name_or_path is not None else tokenizer_file
        self._source = tokenizer_file  # named in error messages
        with open(tokenizer_file, encoding="utf-8") as f:
            self._text = f.read()
        self._build()

    def _build(self) -> None:
        """Parse `self._text`, check it holds a Qwen2-family tokenizer, and make the Rust tokenizer."""
        where = self._source
        try:
            tokenizer_json = json.loads(self._text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from None
        model_type = (tokenizer_json.get("model") or {}).get("type") if isinstance(tokenizer_json, dict) else None
        if model_type != "BPE":
            raise ValueError(f"{where} does not hold a BPE tokenizer (model type {model_type!r}); Qwen2 / Qwen2.5 / "
                             f"Qwen3 folders have a byte-level BPE tokenizer.json")
        try:
            tokenizer = Tokenizer.from_str(_all_added_tokens_special(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"{where} is not a tokenizer file the tokenizers library reads ({e})") from None
        tokenizer.encode_special_tokens = True
        added = {token["content"]: token for token in tokenizer_json.get("added_tokens", [])}
        missing = [name for name in REQUIRED_TOKENS if name not in added]
        if missing:
            raise ValueError(f"{where} has no added token {', '.join(missing)}: "
                             "not a Qwen2 / Qwen2.5 / Qwen3 tokenizer "
                             f"(they add {', '.join(REQUIRED_TOKENS)} from id 151643)")
        self._tokenizer = tokenizer
        self._ids = {name: tokenizer.token_to_id(name) for name in REQUIRED_TOKENS}
        self.special_ids: frozenset[int] = frozenset(token["id"] for token in added.values())
        # what decode(skip_special_tokens=True) drops: the tokens the file itself marks special
        self._skipped_ids = frozenset(token["id"] for token in added.values() if token.get("special"))
        self._known_ids = frozenset(tokenizer.get_vocab(with_added_tokens=True).values())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Qwen2Tokenizer:
        """Load `folder/tokenizer.json`. FileNotFoundError or ValueError, with one line naming the folder and what
        is missing or wrong, for anything else."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder} (expected a Qwen2 / Qwen2.5 / Qwen3 folder "
                                    f"with {TOKENIZER_FILE} in it)")
        tokenizer_file = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}{_what_is_there(folder)}")
        return cls(tokenizer_file, name_or_path=folder)

    # pickling: the Rust tokenizer is rebuilt from the file's text
    def __getstate__(self) -> dict[str, Any]:
        return {"_text": self._text, "_source": self._source, "name_or_path": self.name_or_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    # ---------------------------------------------------------------------------------------------
    # Ids
    # ---------------------------------------------------------------------------------------------

    @property
    def eod_id(self) -> int:
        """`<|endoftext|>`: end of a document (151643)."""
        return self._ids[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._ids[IM_END]

    @property
    def pad_token_id(self) -> int:
        """`<|endoftext|>`, Qwen2's pad token (as the published tokenizer_config.json names it)."""
        return self.eod_id

    @property
    def image_token(self) -> str:
        """The placeholder text of one image feature row: `<|image_pad|>`."""
        return IMAGE_PAD

    @property
    def image_token_id(self) -> int:
        """The id of `<|image_pad|>` (151655): reserved by Qwen2's vocabulary for image features."""
        return self._ids[IMAGE_PAD]

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant answer: `<|im_end|>`, `<|im_start|>`, `<|endoftext|>` (in that order)."""
        return [self.im_end_id, self.im_start_id, self.eod_id]

    def answer_token_ids(self) -> list[int]:
        """Ids an answer may hold, ascending: every ordinary BPE token, then the three stop ids. Never
        `<|image_pad|>` or another added token, nor a padding row of the embedding (ids past the tokenizer)."""
        ordinary = sorted(set(self._tokenizer.get_vocab(with_added_tokens=False).values()) - self.special_ids)
        return [*ordinary, *self.stop_token_ids]

    @property
    def vocab_size(self) -> int:
        """Number of tokens: ordinary BPE tokens plus added tokens (151665 for Qwen2.5, 151669 for Qwen3).
        An embedding may have more rows (151936 or 152064): the rows past the tokenizer are padding."""
        return len(self._known_ids)

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ---------------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` as ordinary text (NFC-normalised, as the file says): no added token is ever produced,
        whatever the text holds, and nothing is added around it."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text takes one str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of `token_ids` (an int, a list, a 1-D tensor or array), as transformers' `decode` gives it.

        skip_special_tokens drops the added tokens the file marks special (the ChatML markers, the vision
        tokens), and keeps the others. Other keyword arguments (transformers' streamer passes
        `clean_up_tokenization_spaces`) are accepted and ignored: Qwen2 does no clean-up.
        Raises ValueError for an id the tokenizer does not have (a padding row of the embedding, say).
        """
        del kwargs
        ids = to_id_list(token_ids)
        if not self._known_ids.issuperset(ids):
            bad = next(i for i in ids if i not in self._known_ids)
            raise ValueError(f"token id {bad} is not in the tokenizer of {self.name_or_path} "
                             f"({self.vocab_size} tokens)")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """`decode` of each sequence (a list of lists, a 2-D tensor or array)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def __repr__(self) -> str:
        return f"Qwen2Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def _what_is_there(folder: str) -> str:
    """The end of the "no tokenizer.json" message: what the folder holds instead, when that says what it is."""
    if os.path.isfile(os.path.join(folder, VOCAB_FILE_NAME)):
        return f" but has {VOCAB_FILE_NAME}: a Qwen-7B (v1) folder, which qwen.QWenTokenizer loads"
    if os.path.isfile(os.path.join(folder, "vocab.json")):
        return (" (vocab.json and merges.txt alone are not read: the published Qwen2 / Qwen2.5 / Qwen3 folders "
                f"ship {TOKENIZER_FILE}, copy it in)")
    return f" (expected the {TOKENIZER_FILE} that Qwen2 / Qwen2.5 / Qwen3 folders ship)"
