"""The documented commands of this repository answer `--help` (and check their arguments) before the seconds of
peft and transformers' model code: their modules import neither, only the functions that build or load a model do.
(tests/test_documented_commands.py runs each `--help` as typed; on the 2-core CI machine those imports were most
of its minutes.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_documented_commands import PROGRAMS, ROOT

# Loaded by any transformers model class, by the Trainer, and by peft itself.
HEAVY = ("peft", "transformers.modeling_utils", "transformers.trainer")
# Commands whose help needs them, and why.
HEAVY_HELP = {
    "train": "its --help lists TrainingArguments' flags, and transformers.training_args imports peft",
    "demo.evaluate": "it takes train.py's flags (settings.training.parse_train_args)",
}


def command_modules() -> list[str]:
    """The module of each documented `python` command that is a file of this repository (not pytest, venv, ...)."""
    modules = set()
    for interpreter, *target in PROGRAMS:
        if interpreter != "python":
            continue
        if target[0] == "-m":
            name, path = target[1], ROOT.joinpath(*target[1].split(".")).with_suffix(".py")
        else:
            name, path = target[0].removesuffix(".py").replace("/", "."), ROOT / target[0]
        if path.is_file() and name not in HEAVY_HELP:
            modules.add(name)
    return sorted(modules)


IMPORT_EACH = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
    if heavy:
        print(json.dumps([name, heavy]))
        break
else:
    print(json.dumps(None))
"""


def test_command_modules_import_no_model_code():
    modules = command_modules()
    assert {"bench.data", "model.export", "dataset.preflight", "demo.prepare", "infer"} <= set(modules), modules
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(modules), json.dumps(HEAVY)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads(result.stdout.strip().splitlines()[-1])
    assert first is None, f"importing {first[0]} (what its --help runs) imports {first[1]}"
