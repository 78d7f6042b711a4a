"""FER+ beyond the paper: configs/ferplus.py with the recipe levers that paid, for a CPU budget.

Each lever was first trained alone against the paper's recipe at 30 epochs and scored on the FER+
validation split (`python -m experiments.paper.recipe_levers`; the table:
experiments/results/recipe_levers/full/table.md). A lever joins the recipe when it gains at least
a point of validation accuracy on one seed, or gains on each of two seeds (smaller differences are
noise on 3,191 images); macro F1 counts too, since disgust, contempt and fear are rare. The same
study's `recipe` row trains exactly this config's changes together, at the study's budget: 0.8621
validation accuracy, macro F1 0.735 at 30 epochs, seed 0 (+1.47 / +13.44 points over the paper's
recipe's seed 0; either lever alone gave at most +1.13 / +6.03).

The budget here is 60 epochs; `--config.num_epochs=200` is the paper's. The test split is never
used to choose a lever or a checkpoint. This config at 60 epochs, seed 0, gave the released weights
(experiments/results/ferplus_plus_e60_cosine: 0.8756 best validation accuracy, macro F1 0.763).
The weights released before them (experiments/results/ferplus_plus_e60: 0.8678) were trained with
soft labels alone: `--config.optimizer.schedule=table1 --config.optimizer.warmup_epochs=0` gives
that recipe back.
"""

from configs import ferplus


def get_config():
    c = ferplus.get_config()
    # Gains of each lever alone over the paper's recipe at 30 epochs, validation accuracy / macro F1
    # in points, and the seeds they come from.
    c.dataset.label_mode = "crossentropy"  # FER+ soft labels: +1.13 / +6.03 (seed 0)
    # Linear warm-up for 2 epochs, then cosine decay to 0, in place of Table 1's steps (which, scaled
    # to a short budget, spend its last 40% at <= 1e-5): +0.44 / +2.93 (+0.44 on each of seeds 0, 1).
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_epochs = 2
    # Not joined: horizontal flip, +0.22 / +0.30 over seeds 0 and 1, but -0.12 accuracy on seed 1.
    # Class-balanced loss (p = 0.5): macro F1 +10.78 but accuracy -1.07 (seed 0); the accuracy goal
    # rules it out here, and `--config.class_weighting=0.5` is there for macro F1.
    # Not joined, one seed each (seed 0): mixup (alpha 0.2) -0.25 / -0.22, label smoothing 0.1
    # -0.09 / +5.40, weight EMA +0.00 / -0.16, AdamW 1e-4 +0.28 / +0.55, probability-drawn soft
    # labels +0.13 / +4.46: none gains a point, and the small gains await a second seed.
    c.num_epochs = 60
    return c
