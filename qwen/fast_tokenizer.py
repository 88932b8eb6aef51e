"""Qwen-7B's tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`), with the ids of `qwen.tiktoken`.

`build_fast_tokenizer(vocab_file)` returns a `tokenizers.Tokenizer` that encodes and decodes like
`QWenTokenizer` (tested on the real 151643-rank vocabulary and on tiny ones):

- normaliser: NFC, as `QWenTokenizer.encode` NFC-normalises its input;
- pre-tokeniser: the official split pattern (`PAT_STR`, pieces kept), then the byte-level mapping of GPT-2
  (every byte written as one printable character) without a regex of its own;
- model: byte-level BPE. tiktoken stores only ranks; the merges are rebuilt from them. The merge that makes a
  token is the last step of BPE run on the token's own bytes with the ranks below its own (exactly two parts
  remain), and merges are ordered by the rank of the token they make, which is tiktoken's priority.
  `ignore_merges` takes a piece that is itself a token whole, as tiktoken does;
- the 208 special tokens at their ids from 151643, as added special tokens matched on NFC-normalised text
  (our tokenizer NFC-normalises before it looks for them). Another list of added tokens can be given (Qwen2 /
  Qwen2.5 / Qwen3 put theirs after the same ranks: `llm.tiny`); it takes the same ids from 151643. When the
  vocabulary has fewer than 151643 ranks (tiny test vocabularies), the added tokens are also entered in the
  model's vocabulary at their ids: the `tokenizers` library would otherwise number them from the end of the
  vocabulary;
- decoder: byte-level, invalid UTF-8 replaced by U+FFFD (our tokenizer's errors="replace").

Special-token text. `QWenTokenizer.encode(text)` turns special-token text into special ids by default and keeps
it as ordinary text with `allowed_special=set()`, which our prompt builders use for all message text. The fast
tokenizer has the same two modes: by default (the convention of every transformers tokenizer, which chat
templates and servers rely on to get their ChatML markers) "<|im_end|>" in the text becomes id 151645; with
`split_special_tokens=True` (transformers) / `encode_special_tokens = True` (tokenizers) it stays text, with
exactly the ids of `encode(text, allowed_special=set())`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .tokenization_qwen import PAT_STR, SPECIAL_START_ID, SPECIAL_TOKENS, load_tiktoken_ranks


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 bytes are
    written as the characters from U+0100 on, in byte order (the map the `ByteLevel` pre-tokeniser applies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(0x100 + shifted)
            shifted += 1
    return alphabet


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` alone, using only ranks below `max_rank`: repeatedly join the adjacent pair
    whose join has the lowest rank (leftmost on ties) until no pair qualifies."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def rebuild_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that produce every multi-byte token, in the order of the ranks they produce.

    Raises ValueError for a token that its lower ranks cannot build in one last merge (a vocabulary that is
    not a byte-level BPE), or when a single byte is missing (BPE could not start from every byte).
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"the vocabulary lacks single-byte tokens for bytes {missing[:8]}; "
                         "byte-level BPE needs all 256")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens: "
                             f"its lower ranks leave {len(parts)} parts {parts[:4]}")
        merges.append((parts[0], parts[1]))
    return merges


def qwen_special_tokens() -> list[AddedToken]:
    """Qwen-7B's 208 special tokens in id order, special and matched on NFC-normalised text (as QWenTokenizer)."""
    return [AddedToken(token, special=True, normalized=True) for token in SPECIAL_TOKENS]


def _merges_of(vocab_file: str | os.PathLike) -> tuple[tuple[bytes, bytes], ...]:
    """`rebuild_merges` of a vocabulary file, computed once per process for a file left unchanged (about 15 s for the
    real 151643 ranks; the export and each family's tokenizer files need them)."""
    path = os.path.realpath(vocab_file)
    st = os.stat(path)
    return _cached_merges(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_merges(path: str, size: int, mtime_ns: int) -> tuple[tuple[bytes, bytes], ...]:
    del size, mtime_ns  # part of the cache key only
    return tuple(rebuild_merges(load_tiktoken_ranks(path)))


def build_fast_tokenizer(vocab_file: str | os.PathLike, added_tokens: Sequence[AddedToken] | None = None, *,
                         ignore_merges: bool = True) -> Tokenizer:
    """A `tokenizers.Tokenizer` with the ids of `QWenTokenizer(vocab_file)` (see the module docstring).

    `added_tokens` are the tokens that follow the ranks, numbered in order from id 151643 whatever the size of
    the vocabulary file (default: Qwen-7B's 208 special tokens, `qwen_special_tokens()`); Qwen2 / Qwen2.5 /
    Qwen3 add their own list after the same ranks (llm/tiny.py). `ignore_merges=False` makes the BPE model
    apply merges to a piece that is itself a token (the Qwen2 files' setting); the ids are the same either way
    on the real vocabulary, as every token is the result of BPE on its own bytes (tests/model/test_export_llava.py,
    tests/llm/test_qwen2_tokenizer.py).
    Raises ValueError if an added token is also an ordinary token or is listed twice.
    """
    if added_tokens is None:
        added_tokens = qwen_special_tokens()
    added_ids = {token.content: SPECIAL_START_ID + i for i, token in enumerate(added_tokens)}
    if len(added_ids) != len(added_tokens):
        raise ValueError(f"an added token is listed twice: {[t.content for t in added_tokens]}")
    ranks = load_tiktoken_ranks(vocab_file)
    alphabet = byte_level_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    clashes = sorted(set(added_ids) & set(vocab))
    if clashes:
        raise ValueError(f"added tokens {clashes[:3]} are also ordinary tokens of {vocab_file}")
    if len(ranks) != SPECIAL_START_ID:  # ids left free below the added tokens: keep them at their ids
        vocab.update(added_ids)
    merges = [(spell(a), spell(b)) for a, b in _merges_of(vocab_file)]
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=merges, ignore_merges=ignore_merges, byte_fallback=False, fuse_unk=False, dropout=None
    ))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no token
    for token in added_tokens:  # one at a time, in id order; only add_special_tokens registers a special token
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
    wrong = {t: tokenizer.token_to_id(t) for t, i in added_ids.items() if tokenizer.token_to_id(t) != i}
    if wrong:
        raise ValueError(f"added tokens landed on other ids: {dict(list(wrong.items())[:3])}")
    return tokenizer
