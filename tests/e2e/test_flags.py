"""Command-line flags are never abbreviated: `--learning_rat 3` is an unknown flag, not --learning_rate 3.0."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from settings import ConfigError
from settings.training import parse_train_args

ROOT = Path(__file__).resolve().parents[2]

# (module whose main(argv) parses the command line, argv with an abbreviated flag, the abbreviation)
CASES = [
    ("infer", ["--prompt", "x", "--max-new", "4"], "--max-new"),
    ("evaluate", ["--predictions", "x.jsonl", "--pt"], "--pt"),
    ("process_image", ["--config", "none.yaml", "--cache-feat"], "--cache-feat"),
    ("model.export", ["--checkpoint", "a", "--output", "b", "--overwr"], "--overwr"),
    ("dataset.preflight", ["--config", "none.yaml", "--ind", "0"], "--ind"),
    ("demo.prepare", ["--config", "none.yaml", "--forc"], "--forc"),
    ("bench.tokenizer", ["--repeat", "1"], "--repeat"),
    ("bench.generate", ["--size", "tiny", "--new-tok", "1"], "--new-tok"),
    ("bench.train_step", ["--size", "tiny", "--ste", "1"], "--ste"),
    ("bench.data", ["--loader", "0"], "--loader"),
    ("bench.vllm_generate", ["--size", "tiny", "--new-tok", "1"], "--new-tok"),
    ("demo.check_export", ["--checkpoint", "a", "--export", "b", "--image", "c", "--prompt", "d", "--max-new", "4"],
     "--max-new"),
    ("bench.evaluate", ["--batch", "8"], "--batch"),
    ("bench.demo_seeds", ["--seed", "3"], "--seed"),
    ("bench.engines", ["--step", "2"], "--step"),
    ("webui", ["--shar"], "--shar"),
]


@pytest.mark.parametrize("module,argv,abbreviation", CASES, ids=[c[0] for c in CASES])
def test_argparse_commands_refuse_abbreviations(module, argv, abbreviation, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--learning_rat", "--learning-rat", "--projector_learning"])
def test_train_py_refuses_abbreviations(flag):
    """train.py, demo.evaluate: HfArgumentParser is an argparse parser too."""
    with pytest.raises(ConfigError, match=f"unknown command-line arguments: {flag} 3"):
        parse_train_args(["--config", str(ROOT / "config.yaml"), flag, "3"])
