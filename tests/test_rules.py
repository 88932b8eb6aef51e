"""Rules of the test suite itself."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns", "process_time"}


def _reads_clock(node: ast.AST, clock_names: set[str]) -> bool:
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr in CLOCKS
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id == "time"):
            return True
        if isinstance(sub, ast.Name) and sub.id in clock_names:
            return True
    return False


def timed_assertions(source: str) -> list[int]:
    """Lines of the asserts that depend on the wall clock (directly, or through a variable that holds a time)."""
    tree = ast.parse(source)
    clock_names: set[str] = set()
    for _ in range(3):  # start = clock(); elapsed = clock() - start; took = elapsed * 1000 ...
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _reads_clock(node.value, clock_names):
                clock_names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert) and _reads_clock(node, clock_names)]


def test_the_rule_sees_a_timed_assertion():
    assert timed_assertions("start = time.perf_counter()\nf()\nassert time.perf_counter() - start < 2.0\n") == [3]
    assert timed_assertions("t0 = time.time()\nf()\ndt = time.time() - t0\nassert dt < 1\n") == [4]
    # a deadline for waiting on a server is not a timed test
    assert timed_assertions("deadline = time.monotonic() + 300\nwhile time.monotonic() < deadline:\n    pass\n") == []


def test_no_test_asserts_on_the_clock():
    """No timed tests: a wall-clock bound fails on a busy machine and passes on a fast one whatever the code
    does. Speed is a figure printed by a benchmark in bench/."""
    found = [f"{path.relative_to(TESTS)}:{line}" for path in sorted(TESTS.rglob("*.py"))
             for line in timed_assertions(path.read_text(encoding="utf-8"))]
    assert not found, f"tests that assert on the clock: {found}"


def direct_safetensors_writes(source: str) -> list[int]:
    """Lines that import or call safetensors' own writers (save_file, save_model)."""
    writers = {"save_file", "save_model"}
    return [node.lineno for node in ast.walk(ast.parse(source))
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safetensors")
                and any(alias.name in writers for alias in node.names))
            or (isinstance(node, ast.Attribute) and node.attr in writers
                and isinstance(node.value, ast.Attribute) and node.value.attr == "torch")]


def test_the_safetensors_rule_sees_a_direct_write():
    assert direct_safetensors_writes("from safetensors.torch import load_file, save_file\n") == [1]
    assert direct_safetensors_writes("import safetensors.torch\nsafetensors.torch.save_file(t, 'x')\n") == [2]
    assert direct_safetensors_writes("from safetensors.torch import load_file\nsave_safetensors(t, p)\n") == []


def test_safetensors_files_are_written_by_one_writer():
    """safetensors' save_file makes owner-only files (0600) whatever the umask: the project's code writes them
    through common.safetensors_file.save_safetensors (whole, 0644), the one module that calls it. Tests may
    write fixtures as they like."""
    packages = [p.parent for p in sorted(ROOT.glob("*/__init__.py")) if p.parent != TESTS]
    files = [*sorted(ROOT.glob("*.py")), *(f for package in packages for f in sorted(package.rglob("*.py")))]
    assert any(f.name == "checkpoint.py" for f in files)  # the scan sees the project's code
    found = [f"{f.relative_to(ROOT)}:{line}" for f in files if f != ROOT / "common" / "safetensors_file.py"
             for line in direct_safetensors_writes(f.read_text(encoding="utf-8"))]
    assert not found, f"safetensors written directly (use common.safetensors_file.save_safetensors): {found}"


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules a source imports, `import x.y`, `from x import y` and
    `importlib.import_module("x")` alike."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value.split(".")[0])
    return found


def test_the_import_rule_sees_every_form():
    assert imported_modules("import a.b\nfrom c.d import e\nimportlib.import_module('f.g')\nfrom . import h\n") == {
        "a", "c", "f"}


def test_bitsandbytes_is_imported_by_llm_quantization_only():
    """bitsandbytes is optional (requirements-dev.txt, not requirements.txt): the project imports it in one module,
    which says what to install where it is missing (transformers and peft import it for the 4-bit layers)."""
    packages = [p.parent for p in sorted(ROOT.glob("*/__init__.py")) if p.parent != TESTS]
    files = [*sorted(ROOT.glob("*.py")), *(f for package in packages for f in sorted(package.rglob("*.py")))]
    importers = {f.relative_to(ROOT).as_posix() for f in files
                 if "bitsandbytes" in imported_modules(f.read_text(encoding="utf-8"))}
    assert importers == {"llm/quantization.py"}


def test_ruff_finds_nothing():
    """`ruff check` with the project's configuration (pyproject.toml: line length 120 enforced) passes on the whole
    checkout, so the style the configuration states is the one the code keeps."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
