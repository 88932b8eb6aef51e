import subprocess
import sys
from pathlib import Path

import pytest

from bench.requires import RERUN, VENV_PYTHON, require_packages

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_package_is_one_line_and_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        require_packages("bench/data.py", ("numpy", "no_such_package_xyz"), venv_python=tmp_path / "no-venv-python")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench/data.py: ")
    assert "lacks no_such_package_xyz:" in err and "pip install -r requirements.txt" in err


def test_the_second_run_never_runs_a_third(capsys, tmp_path, monkeypatch):
    python = tmp_path / "python"
    python.write_text("")  # exists: only the marker of the second run keeps it from being run
    monkeypatch.setenv(RERUN, "1")
    with pytest.raises(SystemExit) as stop:
        require_packages("bench/data.py", ("no_such_package_xyz",), venv_python=python)
    assert stop.value.code == 2 and "activate the project's environment" in capsys.readouterr().err


def test_installed_packages_pass():
    require_packages("bench/data.py")  # the environment the tests run in has every package the benchmarks import


def base_python_without_torch() -> str | None:
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.is_file():
        return None
    probe = subprocess.run([str(base), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           check=False, capture_output=True, text=True)
    return str(base) if probe.stdout.strip() == "True" else None


@pytest.mark.parametrize("script", ["data", "generate", "train_step"])
def test_help_as_typed_with_a_python_lacking_the_packages_runs_in_the_checkouts_venv(script):
    # `python bench/NAME.py --help` typed without the environment activated: the system Python has no torch, so
    # the benchmark runs itself again with .venv/bin/python (what README's install creates) and answers
    python = base_python_without_torch()
    if python is None or not VENV_PYTHON.is_file():
        pytest.skip("needs a base Python without torch and the checkout's .venv")
    done = subprocess.run([python, f"bench/{script}.py", "--help"], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}.py"), done.stdout
    assert f"running with {VENV_PYTHON}" in done.stderr
