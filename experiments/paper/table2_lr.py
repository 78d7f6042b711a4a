"""Table 2: constant learning rates 1e-2 .. 1e-5 against the Table 1 schedule.

    python -m experiments.paper.table2_lr --quick                      # synthetic faces, minutes on a CPU
    python -m experiments.paper.table2_lr --manual_dir /data/ferplus   # FER+, the paper's budget
    python -m experiments.paper.table2_lr --dataset ckplus --manual_dir /data/ckplus [--folds 0]
    python -m experiments.paper.table2_lr --dataset ckplus --manual_dir /data/ckplus --epochs 20   # reduced

Every row keeps the paper's Adam, loss and epochs; only the learning rate schedule changes.
"""

from experiments.paper import common

PAPER = {  # Wang & Zhang 2023, Table 2 (published accuracies)
    "lr_1e-2": {"ferplus": 0.8453, "ckplus": 0.9116},
    "lr_1e-3": {"ferplus": 0.8676, "ckplus": 0.9048},
    "lr_1e-4": {"ferplus": 0.8577, "ckplus": 0.9524},
    "lr_1e-5": {"ferplus": 0.7082, "ckplus": 0.8980},
    "table1": {"ferplus": 0.8780, "ckplus": 0.9932},
}


def _constant(name: str, lr: float, label: str) -> common.Row:
    return common.Row(name, (f"{label} (constant)",),
                      {"optimizer.schedule": "constant", "optimizer.learning_rate": lr}, PAPER[name])


STUDY = common.Study(
    name="table2_lr",
    title="Table 2: learning rate",
    row_headers=("Learning rate",),
    rows=(
        _constant("lr_1e-2", 1e-2, "0.01"),
        _constant("lr_1e-3", 1e-3, "0.001"),
        _constant("lr_1e-4", 1e-4, "0.0001"),
        _constant("lr_1e-5", 1e-5, "0.00001"),
        common.Row("table1", ("Table 1 schedule",), {"optimizer.schedule": "table1"},
                   PAPER["table1"]),
    ),
    paper_columns=(("ferplus", "Paper FER+"), ("ckplus", "Paper CK+")),
    note="Constant Adam learning rates against the paper's piecewise-constant schedule (Table 1, "
         "rate changes at the start of epochs 81/121/161/181 of 200, scaled to the run's epochs). "
         "Paper columns: the accuracies published in Wang & Zhang 2023, Table 2.",
)

if __name__ == "__main__":
    common.main(STUDY)
