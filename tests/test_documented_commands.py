"""Every command that README.md and docs/*.md show starts as typed: from the checkout root, in a subprocess, its
`--help` exits 0 and prints its usage, and every flag the documents give it is one the command knows. The other
way round, docs/COMMANDS.md documents every one of this project's commands shown: each has a section there, and
every option its `--help` lists is named in that section (each --help runs once for both checks).

A command is a `python ...`, `python3 ...` or `bash ...` line of a fenced code block, or an inline code span that
starts that way; `A && B` is two commands and `NAME=value` before a command is its environment. `python` runs
as this interpreter, without the site's .pth files (see run_help): the checkout is importable only as a command
makes it so itself, not through an installed copy. `python bench/x.py` puts bench/ first on the path, so the bench
scripts put the checkout's root there instead (the old bench/common.py shadowed the top-level `common`, and an
editable install made before llm/ existed hid that those scripts could not import it).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Not run with --help, and why (each is run as typed by its own tests).
NOT_RUN: dict[tuple[str, ...], str] = {}
# Flags a command takes that its --help does not list, and why. settings.training.parse_train_args reads
# `--config` itself before the HfArgumentParser that prints the help (a gap of the help text, not of the command).
UNLISTED_FLAGS = {("python", "train.py"): {"--config"}, ("python", "-m", "demo.evaluate"): {"--config"}}

# The reference of every command (docs/COMMANDS.md): a section per command, headed by the command in a code span.
REFERENCE = ROOT / "docs" / "COMMANDS.md"
# Commands the documents show that are not this project's: their options are documented by their own projects.
NOT_OURS = {("python", "-m", "pytest"), ("python", "-m", "venv"), ("python", "-m", "torch.distributed.run")}
# A command that takes another one's flags, documented in that one's section.
FLAGS_OF = {("python", "-m", "demo.evaluate"): ("python", "train.py"), ("bash", "train.sh"): ("python", "train.py")}

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


def module_form(name: tuple[str, ...]) -> tuple[str, ...]:
    """A script of a package run by path as the module it is: ("python", "bench/data.py") -> ("python", "-m",
    "bench.data"), so both forms of one command share one section of the reference."""
    if name[0] == "python" and len(name) == 2 and name[1].endswith(".py") and "/" in name[1]:
        return ("python", "-m", name[1][:-3].replace("/", "."))
    return name


_STARTED: dict[tuple[str, ...], Future] = {}  # the runs the help_runs fixture started


def run_help(name: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`<command> --help` run as typed from the checkout root, in a subprocess. A python command runs with `-S`
    and only this interpreter's site-packages on its path: no .pth file runs, so no installed checkout (an
    editable install, perhaps of another copy or older than this one) makes the project's packages importable;
    the command finds them as a bare checkout offers them (the script's folder, or the current one for `-m`)."""
    interpreter, *target = name
    if interpreter == "python":
        site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        argv = [sys.executable, "-S", *target, "--help"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sorted(site_packages))}
    else:  # the scripts run `python` themselves: this checkout's code first
        argv = ["bash", *target, "--help"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@functools.cache
def help_result(name: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`<command> --help` (`run_help`), once per session: the run help_runs started, else one now."""
    return _STARTED[name].result() if name in _STARTED else run_help(name)


def help_options(help_text: str) -> list[str]:
    """The options an argparse --help lists (the first name of each entry of its options list), --help aside."""
    _, _, listed = help_text.partition("\noptions:\n")
    names = re.findall(r"^  (?:-\w, )?(--[a-z0-9][a-z0-9_-]*)", listed, re.M)
    return [name for name in names if name != "--help"]


def reference_sections(text: str) -> dict[tuple[str, ...], str]:
    """{command: its section}: each heading of the reference that starts with a code span holding a command, and
    the text up to the next heading of the same or a higher level."""
    text = _FENCE.sub(lambda block: re.sub(r"^#", " #", block.group(0), flags=re.M), text)  # no headings in code
    headings = list(re.finditer(r"^(#{1,6}) +(.*)$", text, re.M))
    sections = {}
    for index, heading in enumerate(headings):
        command = re.match(r"`((?:python3?|bash) [^`]+)`", heading.group(2))
        if not command:
            continue
        level = len(heading.group(1))
        end = next((later.start() for later in headings[index + 1:] if len(later.group(1)) <= level), len(text))
        sections[module_form(program(command.group(1)))] = text[heading.start():end]
    return sections


@functools.cache
def inherited_training_options() -> frozenset[str]:
    """The options train.py takes from transformers.TrainingArguments unchanged: documented by transformers (the
    reference says so), not one by one. Fields that settings.training.TrainArguments adds or redefines are ours."""
    from dataclasses import fields

    from transformers import TrainingArguments

    from settings.training import TrainArguments

    ours = set(inspect.get_annotations(TrainArguments))
    names = {field.name for field in fields(TrainingArguments)} - ours
    return frozenset({f"--{name}" for name in names} | {f"--no_{name}" for name in names})


def our_programs() -> dict[tuple[str, ...], tuple[str, ...]]:
    """{command as the reference heads it: a documented form of it}, for this project's commands that have a
    --help to read."""
    found = {}
    for name in sorted(PROGRAMS):
        if name not in NOT_OURS and name not in NOT_RUN:
            found.setdefault(module_form(name), name)
    return found


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


@pytest.fixture(scope="module", autouse=True)
def help_runs(request):
    """The `--help` runs this session's tests of this module ask for, all started at once and run as many at a
    time as this process may use CPUs (at most 4: each interpreter takes memory): most of a run is a new
    interpreter's imports, and one at a time would leave the other cores idle. `help_result` then waits for them."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is None or item.module.__name__ != __name__ or not hasattr(item, "callspec"):
            continue
        name = item.callspec.params.get("name")
        if getattr(item, "originalname", None) == "test_documented_command_prints_its_help_as_typed":
            wanted.add(name)
        elif getattr(item, "originalname", None) == "test_every_help_option_is_in_the_reference":
            wanted.add(our_programs()[name])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=min(cpus, 4)) as pool:
        _STARTED.update({name: pool.submit(run_help, name) for name in sorted(wanted - set(NOT_RUN))})
        yield
        _STARTED.clear()


@pytest.mark.parametrize("name", sorted(PROGRAMS), ids=[" ".join(p) for p in sorted(PROGRAMS)])
def test_documented_command_prints_its_help_as_typed(name):
    if name in NOT_RUN:
        pytest.skip(NOT_RUN[name])
    result = help_result(name)
    assert result.returncode == 0, f"{' '.join(name)} --help: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout.lower(), result.stdout[-2000:]
    documented_flags = {flag for line in PROGRAMS[name] for flag in _FLAG.findall(line.split(": ", 1)[1])}
    unknown = sorted(flag for flag in documented_flags - UNLISTED_FLAGS.get(name, set()) if flag not in result.stdout)
    assert not unknown, f"{' '.join(name)}: documented flags not in its --help: {unknown} ({PROGRAMS[name]})"


def test_the_reference_extraction():
    """The pieces of the reference check see what they should (an extraction that finds nothing passes)."""
    listed = ("usage: x.py [-h] [--a A]\n\nText with --not-an-option.\n\noptions:\n  -h, --help  show\n"
              "  --a A, --a-alias A  the a\n    --continued text\n  -b, --bee     b\n  --c_d [C_D]\n")
    assert help_options(listed) == ["--a", "--bee", "--c_d"]
    reference = ("# Commands\n## `python infer.py --image PATH`\nabout --stream\n### Batch mode\n--batch\n"
                 "```bash\n# a comment, not a heading\n```\n## `python bench/data.py`\n--images\n## Other\nno\n")
    sections = reference_sections(reference)
    assert sorted(sections) == [("python", "-m", "bench.data"), ("python", "infer.py")]
    assert "--batch" in sections[("python", "infer.py")] and "--images" not in sections[("python", "infer.py")]
    assert sections[("python", "-m", "bench.data")].endswith("--images\n")
    assert {("python", "train.py"), ("python", "infer.py"), ("python", "-m", "model.export"),
            ("python", "-m", "bench.train_step")} <= set(our_programs())
    assert "--learning_rate" in inherited_training_options() and "--stage" not in inherited_training_options()


@pytest.mark.parametrize("name", sorted(our_programs()), ids=[" ".join(p) for p in sorted(our_programs())])
def test_every_help_option_is_in_the_reference(name):
    """Each documented command of the project has a section in docs/COMMANDS.md, which names every option its
    --help lists (train.py's TrainingArguments ones aside: the section points to transformers for those)."""
    sections = reference_sections(REFERENCE.read_text(encoding="utf-8"))
    assert name in sections, f"docs/COMMANDS.md has no section headed by `{' '.join(name)} ...`"
    result = help_result(our_programs()[name])
    assert result.returncode == 0, result.stderr[-2000:]
    section = sections[FLAGS_OF.get(name, name)]
    options = help_options(result.stdout)
    if FLAGS_OF.get(name, name) == ("python", "train.py"):
        options = [option for option in options if option not in inherited_training_options()]
    missing = [option for option in options if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", section)]
    assert not missing, f"{' '.join(name)}: options of its --help that docs/COMMANDS.md does not name: {missing}"
