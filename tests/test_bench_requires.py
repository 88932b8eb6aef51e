import pytest

from bench.requires import require_packages


def test_a_missing_package_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        require_packages("bench/data.py", ("numpy", "no_such_package_xyz"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench/data.py: ")
    assert "lacks no_such_package_xyz:" in err and "pip install -r requirements.txt" in err


def test_installed_packages_pass():
    require_packages("bench/data.py")  # the environment the tests run in has every package the benchmarks import
