"""What a training run records about itself: results.json, its figures, and where it ran.

The loop (`train.train_and_evaluate`) hands over what it measured: the per-epoch history, the
evaluations of its best and last checkpoints. This module turns them into results.json, adds the
library versions, the git commit, the devices and the host, draws the paper's figures (Fig. 6
training curves, Figs. 7-8 confusion matrices, via `report`) and words the stall warnings.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fermsca import config_schema, hostenv, report

RESULTS_FILE = "results.json"
PROGRESS_FILE = "progress.json"


def versions() -> dict[str, str]:
    """The versions of fermsca, its main libraries and Python (TFDS from its package metadata: a
    run on a packed dataset does not import it, and may run where it is not installed)."""
    import flax
    import optax
    import orbax.checkpoint

    import fermsca

    return {"fermsca": fermsca.__version__, "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
            "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": orbax.checkpoint.__version__,
            "tensorflow_datasets": _installed_version("tensorflow-datasets"),
            "python": platform.python_version()}


def _installed_version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str | None:
    """The commit of the fermsca checkout ("-dirty" with uncommitted changes); None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Versions, devices, processes, host and git commit: where a result was measured."""
    devices = jax.devices()
    return {
        "versions": versions(),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "processor": platform.processor(), "cpu": hostenv.cpu()["name"]},
        "git_commit": git_commit(),
    }


def hparams(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """Every config field by its dotted name, non-scalars as text (TensorBoard hyperparameters)."""
    return {name: value if isinstance(value, bool | int | float | str) else str(value)
            for name, value in config_schema.flatten(config).items()}


def epoch_row(epoch: float, train: dict, validation: dict | None, learning_rate: float) -> dict:
    """One row of the run's history (results.json "history", the curves of Fig. 6); validation
    None (no validation split): its fields are None."""
    return {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "validation_loss": None if validation is None else validation["loss"],
            "validation_accuracy": None if validation is None else validation["accuracy"],
            "learning_rate": learning_rate}


def stall_warning(history: list[dict], confusion: np.ndarray | None, class_names) -> str | None:
    """A warning when training has stopped learning: every validation image predicted as one
    class (`confusion`, the validation confusion matrix; None without one), or the epoch's training
    loss unchanged from the previous epoch's (e.g. a learning rate so high that every unit died).
    None when neither holds."""
    predicted = [] if confusion is None else np.flatnonzero(np.asarray(confusion).sum(axis=0))
    epoch = history[-1]["epoch"]
    if len(predicted) == 1 and np.asarray(confusion).sum() > 1:
        return (f"epoch {epoch:g}: every validation image is predicted as "
                f"{class_names[predicted[0]]!r}; the model is not learning (learning rate too "
                "high, or labels that do not vary?)")
    if len(history) >= 2:
        now, before = history[-1]["train_loss"], history[-2]["train_loss"]
        if abs(now - before) <= 1e-6 * max(1.0, abs(now)):
            return (f"epoch {epoch:g}: the training loss stopped moving ({now:.6g}, as in the "
                    "epoch before); the model is not learning (learning rate too high or too low?)")
    return None


def evaluation(result: dict, class_names: Sequence[str], step: int, steps_per_epoch: int) -> dict:
    """A checkpoint's evaluation as recorded: `report.confusion_metrics` of its confusion matrix,
    its loss, step and epoch. `result`: {"loss", "confusion_matrix"} (`train.Trainer.evaluate`)."""
    summary = report.confusion_metrics(result["confusion_matrix"], class_names)
    summary.update(loss=result["loss"], step=step, epoch=step / steps_per_epoch)
    return summary


def results(config: ml_collections.ConfigDict, data: Any, evaluated_split: str | None,
            evaluations: dict[str, dict], history: list[dict], num_steps: int,
            steps_per_epoch: int, parameters: int) -> dict:
    """The results.json record of a completed run, less what only the loop knows at its end
    (status, warnings, wall time, throughput). `evaluations`: {"best"?, "last"} (`evaluation`);
    the headline accuracy is the best checkpoint's, the last one's without a best; with nothing
    evaluated (`evaluated_split` None: every image in train) it is None."""
    headline = evaluations.get("best", evaluations.get("last"))
    return {
        "config": json.loads(config.to_json()),
        "dataset": {
            "name": data.name,
            "class_names": list(data.class_names),
            "split_sizes": {k: int(len(v.images)) for k, v in data.splits.items()},
            "split_counts": {k: dict(v.counts) for k, v in data.splits.items()},
            "source": data.source,
        },
        "evaluated_split": evaluated_split,
        "evaluations": evaluations,
        "accuracy": None if headline is None else headline["accuracy"],
        "best_validation_accuracy": best_validation_accuracy(history),
        "epochs": num_steps / steps_per_epoch,
        "steps": num_steps,
        "history": history,
        "parameters": parameters,
        **environment(),
        "seed": config.seed,
    }


def write_figures(workdir: str, data: Any, evaluated_split: str, evaluations: dict[str, dict],
                  history: list[dict]) -> None:
    """confusion_matrix_<best|last>.png (Figs. 7-8) and training_curves.png (Fig. 6)."""
    for name, summary in evaluations.items():
        report.plot_confusion_matrix(
            np.asarray(summary["confusion_matrix"]), data.class_names,
            os.path.join(workdir, f"confusion_matrix_{name}.png"),
            title=f"{data.name} {evaluated_split}, {name} checkpoint "
                  f"(acc {summary['accuracy']:.4f})")
    if history:
        report.plot_training_curves(history, os.path.join(workdir, "training_curves.png"))


def write_results(workdir: str, record: dict) -> str:
    """Writes `record` to <workdir>/results.json; returns its path."""
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    logging.info("wrote %s", path)
    return path


def best_validation_accuracy(history: list[dict]) -> float | None:
    """The highest validation accuracy among a run's epochs (None without validation)."""
    return max((h["validation_accuracy"] for h in history if h["validation_accuracy"] is not None),
               default=None)


def pace(step: int, num_steps: int, steps_per_epoch: int, leg_start_step: int,
         leg_seconds: float) -> dict:
    """How fast this process (a run's current leg, since its start or resume at `leg_start_step`)
    has gone: wall seconds per epoch, compilation and evaluation included, and the seconds left at
    that pace to `num_steps`; both None before it has finished a step."""
    steps = step - leg_start_step
    if steps <= 0:
        return {"seconds_per_epoch": None, "estimated_seconds_left": None}
    per_step = leg_seconds / steps
    return {"seconds_per_epoch": per_step * steps_per_epoch,
            "estimated_seconds_left": per_step * max(num_steps - step, 0)}


def write_progress(workdir: str, config: ml_collections.ConfigDict, status: str, step: int,
                   num_steps: int, steps_per_epoch: int, history: list[dict], env: dict,
                   leg: tuple[int, float] | None = None) -> str:
    """Writes <workdir>/progress.json: a run's state so far (status "running", "preempted" or
    "completed", the furthest step and epoch, every finished epoch's metrics, when it was written
    and, given `leg` = (the step this process started from, its `time.time()` then), its `pace`),
    rewritten after each epoch, so a long run that stops (a session's end, a preemption) leaves a
    record of how far it got beside its checkpoints, and one that runs can be watched. `env`: the
    run's `environment()`, taken once. Written to a temporary file and renamed: never half-written."""
    now = time.time()
    record = {
        "status": status,
        "step": step,
        "epoch": step / steps_per_epoch,
        "num_epochs": num_steps / steps_per_epoch,
        "updated": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds"),
        **(pace(step, num_steps, steps_per_epoch, leg[0], now - leg[1]) if leg else {}),
        "best_validation_accuracy": best_validation_accuracy(history),
        "history": history,
        "config": json.loads(config.to_json()),
        **env,
        "seed": config.seed,
    }
    path = os.path.join(workdir, PROGRESS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def summary_line(results: dict, path: str) -> str:
    """The line a completed run prints (`python -m fermsca.main`): its headline accuracy, or, trained
    on every image, that nothing was held out."""
    if not results["evaluations"]:
        return (f"trained on every image (no validation or test split), last epoch's train accuracy "
                f"{results['history'][-1]['train_accuracy']:.4f} -> {path}")
    best = results["evaluations"].get("best", results["evaluations"]["last"])
    return (f"{results['evaluated_split']} accuracy {best['accuracy']:.4f} (macro F1 "
            f"{best['macro_f1']:.4f}) -> {path}")

