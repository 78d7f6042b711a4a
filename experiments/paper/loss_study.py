"""Loss: the paper's cosine-similarity loss (eq. 4) against softmax cross-entropy.

    python -m experiments.paper.loss_study --quick                      # synthetic faces, CPU minutes
    python -m experiments.paper.loss_study --manual_dir /data/ferplus   # FER+, the paper's budget

The paper motivates eq. (4) but reports no comparison, so there is no published column.
"""

from experiments.paper import common

STUDY = common.Study(
    name="loss_study",
    title="Loss: cosine similarity against cross-entropy",
    row_headers=("Loss",),
    rows=(
        common.Row("cosine", ("cosine similarity, eq. (4)",), {"loss": "cosine"}),
        common.Row("cross_entropy", ("softmax cross-entropy",), {"loss": "cross_entropy"}),
    ),
    note="Same network, schedule and data; only the training loss changes. The paper gives no "
         "numbers for this comparison.",
)

if __name__ == "__main__":
    common.main(STUDY)
