"""One module per study of the paper (Tables 2-4) and per question it leaves open; see README.md.

Run from the repository root, e.g. `python -m experiments.paper.table3_ablation --quick`.
"""
