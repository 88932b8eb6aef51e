"""The demo's three wording sets (demo/wordings.py): disjoint, and each used only where it belongs; and the demo's
settings have one source (DemoConfig's defaults are config.yaml's demo section)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from dataprocess.aic import PROMPTS as CAPTION_PROMPTS
from demo.pretrain import DEMO_CORPUS, text_conversation, vocab_corpus
from demo.synthetic import write_demo_raw_data
from demo.wordings import KINDS, NEVER_SEEN, SETS, TEXT_ONLY, TRAINED, wordings
from settings import DemoConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_three_sets_are_disjoint_and_none_contains_another():
    every = [w for which in SETS for w in wordings(which)]
    assert len(every) == len(set(every)) == 6 + sum(map(len, TEXT_ONLY.values())) + sum(map(len, NEVER_SEEN.values()))
    for (a, first), (b, second) in itertools.combinations([(w, x) for w in SETS for x in wordings(w)], 2):
        if a != b:
            assert first not in second and second not in first, (a, first, b, second)
    assert set(TEXT_ONLY) == set(NEVER_SEEN) == set(TRAINED) == set(KINDS)
    assert all(len(TEXT_ONLY[k]) >= 4 and len(NEVER_SEEN[k]) >= 2 for k in KINDS)


def test_the_image_training_asks_only_the_trained_wordings(tmp_path):
    paths = write_demo_raw_data(tmp_path / "raw", n_train=12, n_aic=4, n_heldout=1, image_size=56, seed=3)
    rows = json.loads(Path(paths["llava_annotations"]).read_text(encoding="utf-8"))
    asked = {m["value"].removeprefix("<image>\n") for row in rows for m in row["conversations"][::2]}
    assert asked == set(TRAINED.values())
    captions = Path(paths["aic_annotations"]).read_text(encoding="utf-8")
    assert not [w for w in wordings("text_only") + wordings("never_seen") if w in captions]


def test_the_text_pretraining_asks_the_trained_and_text_only_wordings_and_never_the_others():
    rng = np.random.default_rng(0)
    asked = []
    for _ in range(3000):
        turns = text_conversation(rng)
        asked += [query.rsplit("\n", 1)[-1] for query, _ in turns]
    questions = {q for q in asked if q not in CAPTION_PROMPTS}
    assert questions == set(wordings("trained")) | set(wordings("text_only"))  # every one of them, nothing else
    corpus = vocab_corpus()  # the tiny vocabulary's training text
    assert DEMO_CORPUS in corpus
    assert not [w for w in wordings("never_seen") if w in corpus or any(w in q for q in asked)]


def test_demo_config_defaults_are_config_yaml():
    """One source of truth: DemoConfig() is what config.yaml runs (its values are written there for the reader)."""
    demo = load_config(ROOT / "config.yaml").require("demo")
    expected = DemoConfig(workdir=demo.workdir)  # relative paths are resolved against the config's folder
    assert demo == expected
