"""Scoring: tokenisation (English PTB rules, Chinese jieba), caption metrics against hand computations and
pycocoevalcap, the shuffled pairing."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataprocess.schema import IMAGE_MARKER as TAG
from evaluation.samples import EvalSample, derangement, shuffled_partners
from evaluation.scoring import caption_scores, score_rows
from evaluation.text import java_available, tokenize_en, tokenize_ptb, tokenize_zh

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ text


def test_english_tokens_follow_the_coco_ptb_rules():
    assert tokenize_en("A man's hat, on the table.") == ["a", "man", "'s", "hat", "on", "the", "table"]
    assert tokenize_en('"Hello," she said; it isn\'t 1,000 miles: far away...') == [
        "hello", "she", "said", "it", "is", "n't", "1,000", "miles", "far", "away"]
    assert tokenize_en("Two dogs (black) -- a T-shirt costs $3.50!") == [
        "two", "dogs", "-lrb-", "black", "-rrb-", "a", "t-shirt", "costs", "$", "3.50"]


SENTENCES = [
    "A man's hat, on the table.", "Two dogs (black and white) play in the park!", "The T-shirt costs $3.50 -- cheap",
    '"Hello," she said; it\'s 1,000 miles: far away.', "a dog's toy at 5 p.m. e.g. re-use, and/or more",
    "I can't believe it won't work, they'd say.", "A woman’s bag “on” the chair…", "It's 5:30 and mr. smith isn't here",
    "Look at this: a cat!!!", "The kids're playing; we'll see, I'm sure they've left.", "", "A U.S. flag on main st.",
]


@pytest.mark.skipif(not java_available(), reason="the official PTB tokenizer needs java")
def test_english_tokens_equal_the_official_ptb_tokenizer():
    assert [tokenize_en(s) for s in SENTENCES] == tokenize_ptb(SENTENCES)


def test_chinese_segmentation_by_jieba_precise_mode():
    assert tokenize_zh("一个穿着红色衣服的女人在街上走着。") == [
        "一个", "穿着", "红色", "衣服", "的", "女人", "在", "街上", "走", "着"]
    # punctuation is a word boundary and disappears; Latin letters are lower-cased after segmentation
    assert tokenize_zh("在图片的左上角，画着一个红色的圆形") == [
        "在", "图片", "的", "左上角", "画", "着", "一个", "红色", "的", "圆形"]
    assert tokenize_zh("NBA球员在T恤上签名！") == ["nba", "球员", "在", "t恤", "上", "签名"]


def test_jieba_is_quiet_and_writes_no_cache(tmp_path):
    """jieba's default start-up logs to stderr and reads/writes <tmp>/jieba.cache; ours does neither."""
    code = "from evaluation.text import tokenize_zh; print(' '.join(tokenize_zh('两个男人在球场上打篮球')))"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=300)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "两个 男人 在 球场上 打篮球\n"
    assert list(tmp_path.iterdir()) == []


def test_scoring_short_answers_builds_no_jieba_dictionary():
    """Rows of short answers are scored by exact match: their summary names the Chinese tokenizer (its version)
    but segments nothing, so jieba's dictionary (1-2 s to build) is not built; it is for Chinese captions."""
    code = ("from evaluation.scoring import score_rows; from evaluation.text import _jieba, jieba_version\n"
            "rows = [{'language': 'zh', 'kind': 'qa', 'prediction': '左上', 'references': ['左上'],\n"
            "         'answer': '左上'}]\n"
            "summary, _ = score_rows(rows)\n"
            "print(summary['accuracy'], jieba_version() in summary['tokenizer']['zh'], _jieba.cache_info().currsize)")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1.0 True 0\n"


# ------------------------------------------------------------------------------------------------ short answers

# (language, reference, {prediction: counts as correct})
SHORT_ANSWERS = [
    ("en", "A", {"A": True, "a": True, "(A)": True, "A.": True, " a ": True, "the": False, "": False, "...": False,
                 "an": False, "B": False, "(B)": False}),
    ("en", "the A", {"a": True, "A": True, "the": False, "": False}),
    ("en", "a red car", {"Red car.": True, "the red car": True, "car": False, "": False}),
    ("en", "1,000", {"1000": True, "1,000.": True, "1000.0": True, "100": False, "-1000": False, "10 00": False}),
    ("en", "3.5", {"3.50": True, "+3.5": True, "35": False, "3 5": False, "3": False}),
    ("en", "-2", {"-2": True, "2": False, "- 2": False}),
    ("en", "covid-19", {"Covid 19": True, "-19": False, "19": False}),
    ("zh", "3.5米", {"3.50米": True, "35米": False, "": False}),
    ("zh", "左上", {"左上。": True, "右上": False, "": False}),
]


@pytest.mark.parametrize("language,reference,predictions", SHORT_ANSWERS, ids=[r for _, r, _ in SHORT_ANSWERS])
def test_short_answers_keep_letters_and_numbers_and_an_empty_answer_never_counts(language, reference, predictions):
    """Multiple-choice letters: removing articles must not turn the answer "A" into "", which "" or "the"
    would then equal; numbers keep their sign and decimal point."""
    rows = [{"id": i, "language": language, "kind": "qa", "prediction": p, "references": [reference],
             "answer": reference} for i, p in enumerate(predictions)]
    summary, details = score_rows(rows)
    assert {p: d["correct"] for p, d in zip(predictions, details)} == predictions
    assert summary[language]["accuracy"] == sum(predictions.values()) / len(predictions)


def test_an_empty_normalised_prediction_is_never_correct_with_any_normaliser():
    from evaluation.scoring import is_correct

    row = {"id": 1, "language": "en", "prediction": "whatever", "references": ["x"], "answer": "x"}
    assert not is_correct(row, normalise=lambda text, language: "")  # "" == "" is no match
    assert not is_correct(row, normalise=lambda text, language: None)
    assert is_correct(row, normalise=lambda text, language: "same")


# ------------------------------------------------------------------------------------------------ metrics


def test_an_exact_match_scores_bleu_one():
    metrics, per_row = caption_scores(["A man riding a horse on the beach."],
                                      [["a man riding a horse on the beach", "someone on a horse"]], "en")
    for n in (1, 2, 3, 4):
        assert metrics[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rouge_l"] == pytest.approx(1.0)
    zh, _ = caption_scores(["两个男人在打篮球。"], [["两个男人在打篮球"]], "zh")
    assert [zh[f"bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx([1.0] * 4, abs=1e-6)


def cosine_clipped(hyp: dict, ref: dict) -> float:
    """CIDEr-D's similarity of one n-gram order: sum of min(hyp, ref) * ref over the norms (0 if a vector is empty)."""
    norm_h = math.sqrt(sum(v * v for v in hyp.values()))
    norm_r = math.sqrt(sum(v * v for v in ref.values()))
    if not norm_h or not norm_r:
        return 0.0
    return sum(min(v, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, v in hyp.items()) / (norm_h * norm_r)


def test_cider_d_of_a_two_image_corpus_by_hand():
    """CIDEr-D (Vedantam et al. 2015, as the COCO server computes it): tf-idf vectors of 1..4-grams with
    idf = log(images) - log(images whose references hold the n-gram, at least 1); per order, the clipped cosine
    to each reference, times exp(-(len_hyp - len_ref)^2 / (2 * 6^2)); mean over orders and references, x10."""
    hyps = ["a cat", "a dog dog runs"]
    refs = [["a cat sits", "a cat sleeps here now"], ["a dog runs"]]
    L = math.log(2)  # two images; "a" is in both (idf 0), every other n-gram in one (idf log 2), unseen ones too
    penalty = lambda delta: math.exp(-delta**2 / (2 * 6.0**2))  # noqa: E731

    # image 1, hypothesis "a cat" (2 words)
    h1 = [{"a": 0.0, "cat": L}, {"a cat": L}, {}, {}]
    r11 = [{"a": 0.0, "cat": L, "sits": L}, {"a cat": L, "cat sits": L}, {"a cat sits": L}, {}]  # 3 words
    r12 = [{"a": 0.0, "cat": L, "sleeps": L, "here": L, "now": L},  # 5 words
           {"a cat": L, "cat sleeps": L, "sleeps here": L, "here now": L},
           {"a cat sleeps": L, "cat sleeps here": L, "sleeps here now": L},
           {"a cat sleeps here": L, "cat sleeps here now": L}]
    # image 2, hypothesis "a dog dog runs" (4 words): "dog" twice, clipped to the reference's one
    h2 = [{"a": 0.0, "dog": 2 * L, "runs": L}, {"a dog": L, "dog dog": L, "dog runs": L},
          {"a dog dog": L, "dog dog runs": L}, {"a dog dog runs": L}]
    r21 = [{"a": 0.0, "dog": L, "runs": L}, {"a dog": L, "dog runs": L}, {"a dog runs": L}, {}]  # 3 words

    def score(h, refs_and_lengths, hyp_len):
        per_ref = [sum(cosine_clipped(h[n], r[n]) for n in range(4)) / 4 * penalty(hyp_len - ref_len)
                   for r, ref_len in refs_and_lengths]
        return 10 * sum(per_ref) / len(per_ref)

    s1 = score(h1, [(r11, 3), (r12, 5)], 2)
    s2 = score(h2, [(r21, 3)], 4)
    # the same by the numbers: per order 1/sqrt2, 1/sqrt2, 0, 0 and 1/2, 1/2, 0, 0; then 2/sqrt10, 2/sqrt6, 0, 0
    assert s1 == pytest.approx(10 * (math.sqrt(2) / 4 * penalty(1) + 0.25 * penalty(3)) / 2)
    assert s2 == pytest.approx(10 * (2 / math.sqrt(10) + 2 / math.sqrt(6)) / 4 * penalty(1))

    metrics, per_row = caption_scores(hyps, refs, "en")
    assert per_row == pytest.approx([s1, s2], abs=1e-9)
    assert metrics["cider"] == pytest.approx((s1 + s2) / 2, abs=1e-9)


def test_scores_equal_pycocoevalcap_on_hand_tokenised_text_per_language():
    """The plumbing: each language is its own corpus, rows and references stay paired, qa rows are not captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rows = [
        {"id": "a", "language": "en", "prediction": "A dog's ball, on grass.",
         "references": ["The dog's ball.", "A ball on the grass!"]},
        {"id": "b", "language": "zh", "prediction": "两个男人在打篮球。",
         "references": ["两个男人在球场上打篮球", "男人在打球"]},
        {"id": "c", "language": "en", "prediction": "Two cats sleep.", "references": ["two cats are sleeping"]},
        {"id": "q", "language": "en", "kind": "qa", "prediction": "The Red.", "references": ["red"], "answer": "red"},
        {"id": "d", "language": "zh", "prediction": "一只猫", "references": ["一只猫在睡觉。"]},
    ]
    tokens = {  # written by hand from the rules (English PTB-style, Chinese jieba with punctuation removed)
        "en": ({0: ["a dog 's ball on grass"], 1: ["two cats sleep"]},
               {0: ["the dog 's ball", "a ball on the grass"], 1: ["two cats are sleeping"]}),
        "zh": ({0: ["两个 男人 在 打篮球"], 1: ["一只 猫"]},
               {0: ["两个 男人 在 球场上 打篮球", "男人 在 打球"], 1: ["一只 猫 在 睡觉"]}),
    }
    summary, details = score_rows(rows)
    for lang, (res, gts) in tokens.items():
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, cider_rows = Cider().compute_score(gts, res)
        assert [summary[lang][f"bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
        assert summary[lang]["rouge_l"] == pytest.approx(rouge, abs=1e-12)
        assert summary[lang]["cider"] == pytest.approx(cider, abs=1e-12)
        assert summary[lang]["n"] == 2
        scored = [d["cider"] for r, d in zip(rows, details) if r["language"] == lang and "cider" in d]
        assert scored == pytest.approx(list(cider_rows), abs=1e-12)
    assert summary["en"]["accuracy"] == 1.0 and summary["en"]["n_qa"] == 1 and details[3] == {"correct": True}
    assert summary["zh"]["accuracy"] is None and summary["accuracy"] == 1.0


def test_lcs_length_equals_the_full_table_across_block_boundaries():
    import random

    from pycocoevalcap.rouge.rouge import my_lcs

    from evaluation.rouge import lcs_length

    rng = random.Random(0)
    for _ in range(400):
        vocabulary = rng.randint(1, 6)  # few distinct words: many matches, long common subsequences
        a = [str(rng.randrange(vocabulary)) for _ in range(rng.randint(0, 30))]
        b = [str(rng.randrange(vocabulary)) for _ in range(rng.randint(0, 30))]
        expected = my_lcs(a, b)
        assert [lcs_length(a, b, block_bits=k) for k in (1, 3, 8, 64)] == [expected] * 4, (a, b)
    assert lcs_length(["a", "b", "c", "d"], ["x", "a", "y", "c"]) == 2 and lcs_length([], ["a"]) == 0


def test_rouge_l_equals_pycocoevalcap_to_the_last_bit():
    """pycocoevalcap's own Rouge on the same rows: equal means and per-row scores (==, not approximately), with
    empty texts, repeated words and several references of different lengths among them."""
    import random

    from pycocoevalcap.rouge.rouge import Rouge

    from evaluation.rouge import RougeL

    rng = random.Random(1)
    words = ["a", "man", "dog", "rides", "the", "horse", "on", "beach", "red", "ball"]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    res = {i: [text(rng.randint(0, 25))] for i in range(200)}
    gts = {i: [text(rng.randint(0, 25)) for _ in range(rng.randint(1, 5))] for i in range(200)}
    res[0], gts[0] = [""], ["", "a man"]
    ours, our_rows = RougeL().compute_score(gts, res)
    theirs, their_rows = Rouge().compute_score(gts, res)
    assert ours == theirs and list(our_rows) == list(their_rows)


def test_rouge_l_of_a_long_row_takes_memory_linear_in_its_length():
    """A 6,000-word prediction against a 6,000-word reference: pycocoevalcap's LCS table alone is 36M cells
    (about 290 MB of Python lists; a 200k-word row took 23 GB). Every caption metric together stays a few MB."""
    import random
    import tracemalloc

    rng = random.Random(2)
    vocabulary = [f"w{i}" for i in range(500)]
    prediction = " ".join(rng.choices(vocabulary, k=6000))
    reference = " ".join(rng.choices(vocabulary, k=6000))
    tracemalloc.start()
    try:
        metrics, _ = caption_scores([prediction], [[reference]], "en")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MB"
    assert 0 < metrics["rouge_l"] < 1


def test_derangements_move_everyone_and_only_within_groups():
    import random

    for n in (2, 3, 7):
        order = derangement(n, random.Random(n))
        assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    samples = [EvalSample(id=str(i), language="en", kind="qa", prompt=TAG + q, images=[f"{i}.png"], references=["x"],
                          group=q) for i, q in enumerate(["colour?", "shape?", "colour?", "colour?", "corner?"])]
    partners = shuffled_partners(samples, seed=0)
    assert partners == shuffled_partners(samples, seed=0)  # seeded
    assert {partners[i] for i in (0, 2, 3)} == {0, 2, 3} and all(partners[i] != i for i in (0, 2, 3))
    assert partners[1] == 1 and partners[4] == 4  # alone in their group: nobody to swap with
