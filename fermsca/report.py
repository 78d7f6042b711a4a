"""Evaluation reports: metrics from a confusion matrix, the paper's Figs. 6-8 as PNG files.

Confusion matrices are indexed [true class, predicted class] and hold example counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def confusion_metrics(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class accuracy (recall), per-class F1 and macro F1 from a confusion matrix.

    A class with no true and no predicted examples gets recall/F1 of None and is left out of macro F1.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    true_count, pred_count = cm.sum(axis=1), cm.sum(axis=0)
    per_class, f1s = {}, {}
    for k, name in enumerate(class_names):
        recall = tp[k] / true_count[k] if true_count[k] else None
        denom = true_count[k] + pred_count[k]
        f1 = 2 * tp[k] / denom if denom else None
        per_class[name] = None if recall is None else float(recall)
        f1s[name] = None if f1 is None else float(f1)
    defined = [v for v in f1s.values() if v is not None]
    return {
        "num_examples": int(total),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class_accuracy": per_class,
        "per_class_f1": f1s,
        "macro_f1": float(np.mean(defined)) if defined else float("nan"),
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str,
                          title: str = "") -> None:
    """Row-normalised confusion matrix with class names (the paper's Figs. 7 and 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n), dpi=120)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str) -> None:
    """Train and validation accuracy and loss per epoch (the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for split, style in (("train", "-"), ("validation", "--")):
        if any(h[f"{split}_accuracy"] is None for h in history):  # no validation split
            continue
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, label=split)
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
