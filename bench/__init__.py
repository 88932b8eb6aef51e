"""Benchmarks, run from the repository root as modules: `python -m bench.data`, `python -m bench.train_step`, ..."""
