"""Table 3: squeeze-and-excitation and BatchNorm in the multiscale module, on and off.

    python -m experiments.paper.table3_ablation --quick                      # synthetic faces, CPU minutes
    python -m experiments.paper.table3_ablation --manual_dir /data/ferplus   # FER+, the paper's budget
    python -m experiments.paper.table3_ablation --dataset ckplus --manual_dir /data/ckplus [--folds 0]
    python -m experiments.paper.table3_ablation --dataset ckplus --manual_dir /data/ckplus --epochs 20
"""

from experiments.paper import common

NO, YES = "×", "✓"

STUDY = common.Study(
    name="table3_ablation",
    title="Table 3: SE and BN ablation",
    row_headers=("SENet", "BN"),
    rows=(  # Wang & Zhang 2023, Table 3, rows 1-4 (published accuracies)
        common.Row("se0_bn0", (NO, NO), {"model.use_se": False, "model.use_bn": False},
                   {"ferplus": 0.8688, "ckplus": 0.9728}),
        common.Row("se1_bn0", (YES, NO), {"model.use_se": True, "model.use_bn": False},
                   {"ferplus": 0.8716, "ckplus": 0.9864}),
        common.Row("se0_bn1", (NO, YES), {"model.use_se": False, "model.use_bn": True},
                   {"ferplus": 0.8750, "ckplus": 0.9796}),
        # The paper's configuration: Table 2's Table 1 row, whose results it shows if it has none.
        common.Row("se1_bn1", (YES, YES), {"model.use_se": True, "model.use_bn": True},
                   {"ferplus": 0.8780, "ckplus": 0.9932},
                   same_as=("table2_lr", "table1", "Table 2's Table 1 row")),
    ),
    paper_columns=(("ferplus", "Paper FER+"), ("ckplus", "Paper CK+")),
    note="SENet and BN switched in the improved Inception (multiscale) module; everything else as "
         "the paper. Paper columns: the accuracies published in Wang & Zhang 2023, Table 3 (the "
         "extracted text lost the check marks of rows 2 and 3; the order SE-only, BN-only follows "
         "the paper's remark that BN helps more on FER+ and SE more on CK+).",
)

if __name__ == "__main__":
    common.main(STUDY)
