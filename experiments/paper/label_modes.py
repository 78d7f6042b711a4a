"""FER+ label modes: majority vote, cross-entropy on vote distributions, probabilistic label drawing,
multi-target (Barsoum et al. 2016, arXiv 1608.01041).

    python -m experiments.paper.label_modes --quick --data_dir /tmp/tfds --manual_dir /tmp/ferplus
    python -m experiments.paper.label_modes --manual_dir /data/ferplus   # the paper's budget

The paper trains on FER+ without saying which labels it used; we default to majority.
"""

from experiments.paper import common

STUDY = common.Study(
    name="label_modes",
    title="FER+ label modes",
    row_headers=("Label mode",),
    rows=tuple(common.Row(mode, (f"`{mode}`",), {"dataset.label_mode": mode})
               for mode in ("majority", "crossentropy", "probability", "multi_target")),
    datasets=("ferplus",),
    default_dataset={"quick": "ferplus", "full": "ferplus"},
    note="Training targets from the FER+ vote counts (fermsca/datasets/README.md, label modes); "
         "validation and test are always scored against majority labels. Barsoum et al. 2016 "
         "reported probabilistic label drawing as the best of the four with their VGG13; these "
         "rows repeat the comparison with FERNet.",
)

if __name__ == "__main__":
    common.main(STUDY)
