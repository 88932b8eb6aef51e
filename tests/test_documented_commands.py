"""Every command that README.md and docs/*.md show starts as typed: from the checkout root, in a subprocess, its
`--help` exits 0 and prints its usage, and every flag the documents give it is one the command knows.

A command is a `python ...`, `python3 ...` or `bash ...` line of a fenced code block, or an inline code span that
starts that way; `A && B` is two commands and `NAME=value` before a command is its environment. `python` runs
as this interpreter. The checkout's packages are importable from anywhere, as `pip install -r requirements.txt`
(which installs the checkout in editable mode) makes them: PYTHONPATH starts with the checkout, so the code
tested is this checkout's. `python bench/x.py` then puts bench/ first on the path, which is how a module of
bench/ named like a top-level package (the old bench/common.py) broke every bench script run that way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Not run with --help, and why (each is run as typed by its own tests).
NOT_RUN = {
    ("bash", "train.sh"): "passes every flag to train.py after preparing the demo's data (tests/e2e/test_train_*)",
}
# Flags a command takes that its --help does not list, and why. settings.training.parse_train_args reads
# `--config` itself before the HfArgumentParser that prints the help (a gap of the help text, not of the command).
UNLISTED_FLAGS = {("python", "train.py"): {"--config"}, ("python", "-m", "demo.evaluate"): {"--config"}}

_FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
_INLINE = re.compile(r"`((?:python3?|bash) [^`]+)`")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def command_lines(text: str) -> list[str]:
    """The python/python3/bash command lines of a markdown text (fenced blocks, then inline code spans)."""
    lines = []
    for block in _FENCE.findall(text):
        block = re.sub(r"\\\n\s*", " ", block)  # a line ending in a backslash goes on in the next one
        lines += [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    lines += [" ".join(span.split()) for span in _INLINE.findall(text)]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = part.split()
            while words and _ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and words[0] in ("python", "python3", "bash"):
                commands.append(" ".join(words))
    return commands


def program(command: str) -> tuple[str, ...]:
    """What a command runs: ("python", "evaluate.py"), ("python", "-m", "bench.data"), ("bash", "train.sh")."""
    words = shlex.split(command)
    interpreter = "bash" if words[0] == "bash" else "python"
    return (interpreter, *words[1:3]) if words[1:2] == ["-m"] else (interpreter, words[1])


def documented_programs() -> dict[tuple[str, ...], list[str]]:
    """{program: [each command line that runs it, "file: line"]}."""
    found: dict[tuple[str, ...], list[str]] = {}
    for document in DOCUMENTS:
        for command in command_lines(document.read_text(encoding="utf-8")):
            found.setdefault(program(command), []).append(f"{document.name}: {command}")
    return found


PROGRAMS = documented_programs()


def test_the_extraction_finds_the_documented_commands():
    """The extraction itself: the forms the documents use are all seen (a regex that finds nothing passes
    every test below)."""
    for expected in [("python", "bench/train_step.py"), ("python", "bench/generate.py"), ("python", "bench/data.py"),
                     ("python", "bench/demo_seeds.py"), ("python", "-m", "bench.tokenizer"),
                     ("python", "-m", "bench.evaluate"), ("bash", "bench/gpu_suite.sh"), ("python", "evaluate.py"),
                     ("python", "infer.py"), ("python", "-m", "model.export"), ("bash", "train.sh")]:
        assert expected in PROGRAMS, expected
    text = "```bash\nCONFIG=c.yaml bash train.sh   # a comment --no-flag\n  python x.py --a 1 && python -m y.z\n```\n" \
           "and `python w.py --b\n  --c` inline"
    assert command_lines(text) == ["bash train.sh", "python x.py --a 1", "python -m y.z", "python w.py --b --c"]


def run_help(name: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`name --help` from the checkout root, in a subprocess, as typed."""
    interpreter, *target = name
    argv = [sys.executable if interpreter == "python" else "bash", *target, "--help"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def help_runs(request):
    """{program: the Future of its `--help` run}, for the programs this session's tests ask about, all queued at
    once and run as many at a time as this process may use CPUs (at most 4, each interpreter takes memory): most
    of a run is a new interpreter's imports, and one at a time would leave the other cores idle."""
    test = "test_documented_command_prints_its_help_as_typed"
    selected = sorted({item.callspec.params["name"] for item in request.session.items
                       if getattr(item, "originalname", None) == test and item.module.__name__ == __name__}
                      - set(NOT_RUN))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(cpus, 4)) as pool:
        yield {name: pool.submit(run_help, name) for name in selected}


@pytest.mark.parametrize("name", sorted(PROGRAMS), ids=[" ".join(p) for p in sorted(PROGRAMS)])
def test_documented_command_prints_its_help_as_typed(name, help_runs):
    if name in NOT_RUN:
        pytest.skip(NOT_RUN[name])
    result = help_runs[name].result()
    assert result.returncode == 0, f"{' '.join(name)} --help: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout.lower(), result.stdout[-2000:]
    documented_flags = {flag for line in PROGRAMS[name] for flag in _FLAG.findall(line.split(": ", 1)[1])}
    unknown = sorted(flag for flag in documented_flags - UNLISTED_FLAGS.get(name, set()) if flag not in result.stdout)
    assert not unknown, f"{' '.join(name)}: documented flags not in its --help: {unknown} ({PROGRAMS[name]})"
