"""Benchmarks (not tests): `python bench/train_step.py`, `python bench/generate.py`, `python bench/data.py`
(or `python -m bench.<name>`)."""
