"""Benchmarks, profiles and lever tables of the train step on a CPU; see README.md.

Run from the repository root, e.g. `python -m experiments.perf.compare_pytorch`.
"""
