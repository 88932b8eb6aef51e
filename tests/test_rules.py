"""Rules of the test suite itself."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time"}


def test_no_test_reads_the_clock():
    """No timed tests: a wall-clock bound fails on a busy machine and passes on a fast one whatever the code
    does. Speed is a figure printed by a benchmark in bench/."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCKS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert not found, f"tests that read the clock: {found}"
