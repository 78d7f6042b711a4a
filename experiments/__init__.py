"""The paper's studies (`experiments.paper`) and the speed tools (`experiments.perf`); see README.md.

Run from the repository root, e.g. `python -m experiments.paper.table3_ablation --quick`.
"""
