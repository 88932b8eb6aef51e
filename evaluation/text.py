"""Text before scoring: tokenisation per language, language detection, short-answer normalisation.

English (the COCO caption evaluation's rules, without Java): lower-cased and split the way the Stanford PTB
tokenizer that pycocoevalcap runs splits ("a man's hat." -> a man 's hat .; "isn't" -> is n't; "$3.50" -> $
3.50), then the tokens pycocoevalcap removes after it are dropped: '' ' `` ` . ? ! , : - -- ... ; (brackets
are not among them: with `-lowerCase` the tokenizer writes them as -lrb- / -rrb-, which the removal list,
spelt in upper case, never matches, so they stay, here too). `tokenize_ptb` runs the official tokenizer
itself (pycocoevalcap's `PTBTokenizer`, which needs `java` on PATH).

Chinese (AI Challenger's official caption evaluation): punctuation (every Unicode punctuation character)
becomes a word boundary, then jieba segments the text in precise mode (`cut_all=False`, HMM on, jieba's own
dictionary); Latin letters are lower-cased afterwards, as the PTB pass of the official pipeline does.
jieba's prefix dictionary is built here in memory from the installed jieba's `dict.txt`: jieba's default
start-up would read or write a shared cache file in the temporary folder (which another jieba version, a
concurrent run or another user may have written) and log to stderr; this way nothing is written, nothing is
printed and the segmentation depends only on the installed jieba.
"""

from __future__ import annotations

import functools
import re
import shutil
import unicodedata
import warnings

# ------------------------------------------------------------------------------------------------ languages

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
LANGUAGES = ("en", "zh")


def detect_language(texts: list[str]) -> str:
    """"zh" when any text holds a CJK ideograph, else "en"."""
    return "zh" if any(_CJK.search(t) for t in texts) else "en"


# ------------------------------------------------------------------------------------------------ English

# What pycocoevalcap drops after the PTB tokenizer (its PUNCTUATIONS list, as the lower-cased output spells it).
PTB_REMOVED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": " ... "})
_CLITIC = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)(?![a-z0-9])")
_SPLIT_ALWAYS = re.compile(r"""(--+|\.\.\.+|[?!]+|[;"$%#])""")  # "!!!" stays one (kept) token
_SPLIT_OUTSIDE_NUMBERS = re.compile(r"(?<![0-9])[,:]|[,:](?![0-9])")  # 1,000 and 5:30 stay whole
_ABBREVIATION = re.compile(r"^([a-z]\.)+[a-z]?\.?$")  # p.m. u.s.a. e.g.
# Abbreviations the PTB tokenizer keeps with their period, also at the end of a sentence.
_KNOWN_ABBREVIATIONS = frozenset(
    f"{w}." for w in ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "co", "inc", "ltd", "corp", "vs", "etc", "mt", "ave")
)


def _strip_token(token: str) -> str:
    """A token's leading/trailing quotes and trailing sentence periods (abbreviations keep their dots)."""
    if token in PTB_REMOVED or token.startswith(("'s", "'re", "'ve", "'ll", "'d", "'m")) or token == "n't":
        return token
    token = token.strip("'`")
    if token.endswith(".") and not (_ABBREVIATION.match(token) or token in _KNOWN_ABBREVIATIONS):
        token = token.rstrip(".")
    return token


def tokenize_en(text: str) -> list[str]:
    """English caption tokens, as pycocoevalcap's PTB tokenisation + punctuation removal gives them."""
    text = text.translate(_QUOTES).lower()
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, name)
    text = _CLITIC.sub(r" \1", text)
    text = _SPLIT_ALWAYS.sub(r" \1 ", text)
    text = _SPLIT_OUTSIDE_NUMBERS.sub(" ", text)
    tokens = (_strip_token(t) for t in text.split())
    return [t for t in tokens if t and t not in PTB_REMOVED and t != '"']


class TokenizerError(ValueError):
    """The official PTB tokenizer could not tokenise the texts."""


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize_ptb(texts: list[str]) -> list[list[str]]:
    """The official route: pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 through `java`) and its
    punctuation removal. One call for all texts (one Java start)."""
    if not java_available():
        raise FileNotFoundError("the official PTB tokenizer needs `java` on PATH (e.g. apt-get install default-jre)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One-line texts, none empty: the wrapper pairs its output lines with the inputs by position.
    lines = {i: [{"caption": " ".join(t.split()) or "."}] for i, t in enumerate(texts)}
    try:  # the wrapper writes its input file beside its jar, inside the installed package
        out = PTBTokenizer().tokenize(lines)
    except OSError as e:
        raise TokenizerError(f"the official PTB tokenizer could not run ({e})") from e
    if sorted(out) != list(range(len(texts))) or any(len(v) != 1 for v in out.values()):
        raise TokenizerError(f"the official PTB tokenizer returned {len(out)} of {len(texts)} texts")
    return [out[i][0].split() for i in range(len(texts))]


# ------------------------------------------------------------------------------------------------ Chinese


@functools.lru_cache(maxsize=1)
def _jieba_module():
    """The jieba module, imported quietly."""
    with warnings.catch_warnings():  # jieba 0.42 imports pkg_resources, which warns on newer setuptools
        warnings.simplefilter("ignore")
        import jieba
    return jieba


@functools.lru_cache(maxsize=1)
def _jieba():
    """A jieba tokenizer with its prefix dictionary built in memory: no cache file, no log output."""
    tokenizer = _jieba_module().Tokenizer()
    with tokenizer.get_dict_file() as f:
        tokenizer.FREQ, tokenizer.total = tokenizer.gen_pfdict(f)
    tokenizer.initialized = True
    return tokenizer


def jieba_version() -> str:
    """The installed jieba's version, without building its dictionary (1-2 s): a summary of answers scored by
    exact match names the Chinese tokenizer too, and segments nothing."""
    return _jieba_module().__version__


def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def tokenize_zh(text: str) -> list[str]:
    """Chinese caption tokens: punctuation -> word boundary, jieba precise mode, Latin lower-cased."""
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    return [w.lower() for w in _jieba().cut(text, cut_all=False) if w.strip()]


def tokenize(texts: list[str], language: str, *, ptb: bool = False) -> list[list[str]]:
    """Tokens of every text in `language` ("en" | "zh"); `ptb=True` runs the official PTB tokenizer for English."""
    if language == "zh":
        return [tokenize_zh(t) for t in texts]
    if language != "en":
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    return tokenize_ptb(texts) if ptb else [tokenize_en(t) for t in texts]


def tokenizer_description(language: str, *, ptb: bool = False) -> str:
    if language == "zh":
        return f"punctuation removed, jieba {jieba_version()} precise mode (cut_all=False), lower-cased"
    if ptb:
        return "official PTB tokenizer (pycocoevalcap, Stanford CoreNLP 3.4.1, java), COCO punctuation removed"
    return "lower-cased, PTB-style splitting, the punctuation COCO's PTB tokenizer removes taken out (no java)"


# ------------------------------------------------------------------------------------------------ short answers

_ARTICLES = frozenset({"a", "an", "the"})
# A number written with digits, not glued to Latin letters or other digits ("3rd", "a3", "covid-19" hold none):
# an optional sign, digits with optional thousands commas, an optional decimal part. Chinese text may follow
# it directly ("3.5米").
_NUMBER = re.compile(r"(?<![0-9a-z.,])[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![0-9a-z])")


def _number_value(text: str) -> str:
    """One spelling per value: "+1,000.50" -> "1000.5", "007" -> "7", "-0.0" -> "0"."""
    sign = "-" if text.startswith("-") else ""
    whole, _, fraction = text.lstrip("+-").replace(",", "").partition(".")
    value = (whole.lstrip("0") or "0") + ("." + fraction.rstrip("0") if fraction.rstrip("0") else "")
    return value if value == "0" else sign + value


def _words(text: str) -> list[str]:
    """Words of a case-folded text: numbers as their value, punctuation elsewhere a word boundary."""
    words, start = [], 0
    for match in _NUMBER.finditer(text):
        words += "".join(" " if _is_punctuation(ch) else ch for ch in text[start:match.start()]).split()
        words.append(_number_value(match.group()))
        start = match.end()
    return words + "".join(" " if _is_punctuation(ch) else ch for ch in text[start:]).split()


def normalise_answer(text: str, language: str) -> str:
    """A short answer for exact-match comparison: NFKC, case-folded, punctuation removed, whitespace collapsed
    (removed entirely in Chinese). A number written with digits keeps its value (sign, decimal point; thousands
    commas and leading or trailing zeros do not count). In English an article ("a", "an", "the") is dropped
    only before another word, so the answer "A" (a multiple-choice letter) stays "a". An answer with no word
    left normalises to "", which `evaluation.scoring.is_correct` never counts as correct."""
    words = _words(unicodedata.normalize("NFKC", text).casefold())
    if language == "zh":
        return "".join(words)
    return " ".join(w for i, w in enumerate(words) if not (w in _ARTICLES and i + 1 < len(words)))
