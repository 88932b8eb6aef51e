"""The Qwen-7B tokenizer: byte-level BPE (tiktoken) over a `qwen.tiktoken` file, plus 208 special tokens.

It reproduces the official `QWenTokenizer` of Qwen-7B / Qwen-7B-Chat (the later revision, with
`<|extra_0|>` ... `<|extra_204|>`) without inheriting from transformers' tokenizer classes:

- text is NFC-normalised, split with the official pattern and encoded by tiktoken;
- the special tokens sit at fixed ids from 151643, whatever the size of the vocabulary file, so a
  tiny test vocabulary keeps `<|im_start|>` at 151644 like the real one;
- `encode` ALLOWS special-token text by default (`allowed_special="all"`), exactly like the official
  tokenizer. Text that comes from users must be encoded with `allowed_special=set()` (it then stays
  ordinary text) and special ids inserted structurally; see `qwen.chat_format.make_context`;
- Qwen has no pad, bos or unk token. `<|endoftext|>` serves as end-of-document, eos and padding, so
  an attention mask must come from sequence lengths, never from `ids != pad_token_id`.

The vocabulary file has one `base64(token bytes) rank` line per token, ranks 0..n-1.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import os
import shutil
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import tiktoken

VOCAB_FILE_NAME = "qwen.tiktoken"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# The official pre-tokenisation pattern (the same as cl100k_base's, but with single digits).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
# A constant in the official code (not len(ranks)): the special ids do not move with the vocabulary.
SPECIAL_START_ID = 151643
SPECIAL_TOKENS: dict[str, int] = {
    token: SPECIAL_START_ID + i for i, token in enumerate((ENDOFTEXT, IM_START, IM_END, *EXTRAS))
}
MODEL_MAX_LENGTH = 8192
# One image in a prompt: the tag in text, and its id, which the data pipeline repeats once per image feature
# row (the placeholders the multimodal model overwrites). The owner of both for the whole project.
IMAGE_TAG = EXTRAS[0]  # "<|extra_0|>"
IMAGE_TOKEN_ID = SPECIAL_TOKENS[IMAGE_TAG]  # 151646


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `qwen.tiktoken` file into {token bytes: rank}, with errors that name the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file not found: {path} (expected a {VOCAB_FILE_NAME} file of "
                                f"'base64(token) rank' lines)")
    with open(path, "rb") as f:
        contents = f.read()
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{path}, line {lineno}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'base64(token) rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{where}: cannot parse {line[:80]!r} ({e})") from e
        if not token:
            raise ValueError(f"{where}: empty token")
        if rank < 0 or rank >= SPECIAL_START_ID:
            raise ValueError(f"{where}: rank {rank} outside 0..{SPECIAL_START_ID - 1} "
                             f"(ids from {SPECIAL_START_ID} are the special tokens)")
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
        if rank in seen_ranks:
            raise ValueError(f"{where}: rank {rank} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no tokens in the vocabulary file")
    return ranks


def _special_set(value: str | Collection[str], name: str) -> str | frozenset[str]:
    """`"all"` stays as is; any other collection of surface forms becomes a frozenset (tiktoken wants sets)."""
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"{name} must be 'all' or a collection of special-token strings, got {value!r}")
        return value
    return frozenset(value)


def to_id_list(token_ids: Any) -> list[int]:
    """One sequence of ids as a list of ints, from an int, a list, a 1-D torch tensor or numpy array."""
    if hasattr(token_ids, "tolist"):  # torch tensor or numpy array
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    try:
        return [operator.index(i) for i in token_ids]
    except TypeError:
        raise TypeError("expected one sequence of integer token ids (use batch_decode for several)") from None


class TokenBatch(dict):
    """The result of `QWenTokenizer.__call__`: a plain dict (`input_ids`, `attention_mask`) with
    attribute access and `.to(device)` for tensors, so it can be passed on as `model(**batch)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device: Any) -> TokenBatch:
        return TokenBatch({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class QWenTokenizer:
    """Qwen-7B's tokenizer (see the module docstring). `QWenTokenizer(vocab_file)` or `from_pretrained(dir)`."""

    vocab_file_name = VOCAB_FILE_NAME
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, vocab_file: str | os.PathLike, errors: str = "replace",
                 model_max_length: int = MODEL_MAX_LENGTH):
        self.vocab_file = os.fspath(vocab_file)
        self.errors = errors  # how decode() treats invalid UTF-8 (e.g. a character cut in half)
        self.model_max_length = model_max_length
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file)
        self.special_tokens = dict(SPECIAL_TOKENS)
        self._build()

    def _build(self) -> None:
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        # id -> surface form: bytes for ordinary tokens, str for special tokens (as the official class).
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})

    # pickling (DataLoader workers under spawn): rebuild the Rust encoder instead of pickling it
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["tokenizer"], state["decoder"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    # ---------------------------------------------------------------------------------------------
    # Loading and saving
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> QWenTokenizer:
        """Load from a folder holding `qwen.tiktoken` (an official Qwen checkpoint folder, or `save_pretrained`'s)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer folder not found: {directory} (expected a folder with "
                                    f"{VOCAB_FILE_NAME} in it)")
        vocab_file = os.path.join(directory, VOCAB_FILE_NAME)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"{vocab_file} not found: the tokenizer folder {directory} must hold the "
                                    f"vocabulary file {VOCAB_FILE_NAME}")
        config_file = os.path.join(directory, TOKENIZER_CONFIG_NAME)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            for key in ("errors", "model_max_length"):
                if key in config:
                    kwargs.setdefault(key, config[key])
        return cls(vocab_file, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Write `qwen.tiktoken` (a byte copy of the loaded file) and `tokenizer_config.json`."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        vocab_out = os.path.join(directory, VOCAB_FILE_NAME)
        if not (os.path.exists(vocab_out) and os.path.samefile(vocab_out, self.vocab_file)):
            shutil.copyfile(self.vocab_file, vocab_out)
        config_out = os.path.join(directory, TOKENIZER_CONFIG_NAME)
        config = {
            "tokenizer_class": "QWenTokenizer",
            "model_max_length": self.model_max_length,
            "errors": self.errors,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
        }
        with open(config_out, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        return vocab_out, config_out

    # ---------------------------------------------------------------------------------------------
    # Ids and sizes
    # ---------------------------------------------------------------------------------------------

    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    # The chat-tokenizer interface every language backbone's tokenizer has (llm/base.py): the data pipeline,
    # generation and the export use only these members and encode/decode.

    image_token = IMAGE_TAG  # the reserved token each image expands to (its id repeated once per feature row)

    @property
    def image_token_id(self) -> int:
        return self.special_tokens[IMAGE_TAG]

    @property
    def special_ids(self) -> frozenset[int]:
        """Every special id: `encode_text` never gives one."""
        return frozenset(self.special_tokens.values())

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant answer: `<|im_end|>`, `<|im_start|>`, `<|endoftext|>` (in that order)."""
        return [self.im_end_id, self.im_start_id, self.eod_id]

    def answer_token_ids(self) -> list[int]:
        """Ids an answer may hold: the ordinary BPE tokens and the three stop tokens. Never an `<|extra_N|>` (the
        image placeholder among them), an id between the last rank and the specials, or a padding row of the
        embedding."""
        return [*range(min(len(self.mergeable_ranks), SPECIAL_START_ID)), *self.stop_token_ids]

    def encode_text(self, text: str) -> list[int]:
        """Ids of text that must stay text (every message's content): special-token look-alikes such as
        "<|im_end|>" typed in it are encoded as ordinary characters."""
        return self.encode(text, allowed_special=set())

    # No pad/eos of its own: both are <|endoftext|>, as in the official generation_config.json.
    eos_token = ENDOFTEXT
    pad_token = ENDOFTEXT
    eos_token_id = eod_id
    pad_token_id = eod_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens: ranks of the vocabulary file plus the 208 special tokens."""
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def n_vocab(self) -> int:
        """Largest id + 1 (tiktoken's n_vocab): 151851 for any vocabulary, as the specials end at 151850.
        Equal to `vocab_size` for the real vocabulary; an embedding table needs at least this many rows."""
        return self.tokenizer.n_vocab

    # ---------------------------------------------------------------------------------------------
    # Encoding
    # ---------------------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: str | Collection[str] = "all",
               disallowed_special: str | Collection[str] = (), add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (NFC-normalised), as the official tokenizer gives them.

        allowed_special: special-token text that becomes the special id ("all" by default, as officially);
        disallowed_special: special-token text that raises ValueError if present (none by default);
        special-token text in neither is encoded as ordinary text. Same semantics as tiktoken's.
        add_special_tokens is accepted for transformers-style callers; Qwen adds no bos/eos either way.
        """
        del add_special_tokens
        text = unicodedata.normalize("NFC", text)
        return self.tokenizer.encode(
            text,
            allowed_special=_special_set(allowed_special, "allowed_special"),
            disallowed_special=_special_set(disallowed_special, "disallowed_special"),
        )

    def tokenize(self, text: str, allowed_special: str | Collection[str] = "all",
                 disallowed_special: str | Collection[str] = ()) -> list[bytes | str]:
        """Surface forms of `encode(text)`: bytes for ordinary tokens, str for special tokens."""
        return [self.decoder[i] for i in self.encode(text, allowed_special, disallowed_special)]

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | None | list[int | None]:
        """Id of a token (bytes, or a special token's str); None for an unknown token, as officially."""
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: bytes | str) -> int | None:
        if isinstance(token, str):
            return self.special_tokens.get(token)
        return self.mergeable_ranks.get(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int],
                              skip_special_tokens: bool = False) -> bytes | str | list[bytes | str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in to_id_list(ids)
                if not (skip_special_tokens and i >= self.eod_id)]

    def _id_to_token(self, index: int) -> bytes | str:
        try:
            return self.decoder[index]
        except KeyError:
            raise ValueError(f"token id {index} is not in the vocabulary") from None

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        parts: list[str] = []
        pending = b""
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors=self.errors))
                pending = b""
            parts.append(token)
        if pending:
            parts.append(pending.decode("utf-8", errors=self.errors))
        return "".join(parts)

    # ---------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, errors: str | None = None,
               **kwargs: Any) -> str:
        """Text of `token_ids` (an int, a list, a 1-D tensor or array).

        skip_special_tokens drops every id >= eod id (151643), as officially. Invalid UTF-8, such as
        a character whose bytes are split over two calls, is handled with `errors` (default: the
        constructor's, "replace": U+FFFD). Other keyword arguments (e.g. transformers' streamer passes
        clean_up_tokenization_spaces) are accepted and ignored: Qwen does no clean-up.
        """
        del kwargs
        ids = to_id_list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        try:
            return self.tokenizer.decode(ids, errors=errors or self.errors)
        except (KeyError, OverflowError):
            bad = next(i for i in ids if i not in self.decoder)
            raise ValueError(f"token id {bad} is not in the vocabulary ({len(self.mergeable_ranks)} ranks from 0, "
                             f"special ids {SPECIAL_START_ID}..{max(self.special_tokens.values())})") from None

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, errors: str | None = None,
                     **kwargs: Any) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, errors=errors, **kwargs) for s in sequences]

    # ---------------------------------------------------------------------------------------------
    # Batches
    # ---------------------------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, padding_side: str = "right",
                 truncation: bool = False, max_length: int | None = None, return_tensors: str | None = None,
                 allowed_special: str | Collection[str] = "all",
                 disallowed_special: str | Collection[str] = ()) -> TokenBatch:
        """Encode one text or a batch into `input_ids` and `attention_mask`.

        padding: False / "do_not_pad", True / "longest", or "max_length" (needs max_length); padding
        uses `<|endoftext|>` on `padding_side` ("right" or "left"), and the mask is 1 on each text's own
        tokens, 0 on padding, from the lengths. truncation cuts each text to max_length (default:
        model_max_length) on the right. return_tensors="pt" gives torch tensors of shape [B, T].
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a non-empty sequence of str")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if padding is True:
            padding = "longest"
        elif padding is False:
            padding = "do_not_pad"
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True/False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

        rows = [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special) for t in texts]
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            rows = [r[:limit] for r in rows]
        lengths = [len(r) for r in rows]
        if padding == "do_not_pad":
            width = None
        elif padding == "max_length":
            width = max([max_length, *lengths])
        else:
            width = max(lengths)

        input_ids: list[list[int]] = []
        attention_mask: list[list[int]] = []
        for row, n in zip(rows, lengths):
            pad = [] if width is None else [self.pad_token_id] * (width - n)
            mask = [1] * n
            if padding_side == "right":
                input_ids.append(row + pad)
                attention_mask.append(mask + [0] * len(pad))
            else:
                input_ids.append(pad + row)
                attention_mask.append([0] * len(pad) + mask)

        if return_tensors == "pt":
            if len(set(map(len, input_ids))) > 1:
                raise ValueError("texts of different lengths cannot form one tensor: pass padding=True")
            import torch  # only here: tokenizer-only users (process_image.py, the preflight) never pay its ~2 s

            return TokenBatch(input_ids=torch.tensor(input_ids, dtype=torch.long),  # [B, T]
                              attention_mask=torch.tensor(attention_mask, dtype=torch.long))
        if single:
            return TokenBatch(input_ids=input_ids[0], attention_mask=attention_mask[0])
        return TokenBatch(input_ids=input_ids, attention_mask=attention_mask)

    def __repr__(self) -> str:
        return (f"QWenTokenizer(vocab_file={self.vocab_file!r}, ranks={len(self.mergeable_ranks)}, "
                f"special_tokens={len(self.special_tokens)}, errors={self.errors!r})")
