"""Scores a checkpoint on a dataset split: accuracy, per-class accuracy, macro F1, confusion matrix.

    python -m fermsca.evaluate --checkpoint DIR [--split test|validation] [--manual_dir DIR]
        [--data_dir DIR] [--tta [--tta_shift PIXELS]] [--output FILE]

The model and the dataset come from the checkpoint's own config; `--manual_dir` and `--data_dir`
replace the config's, so the released FER+ weights can be scored on a local `FER2013Test/` folder.
The true class of an example is the argmax of its target (the majority vote for FER+), as in
training's evaluation. Writes the metrics as JSON and the row-normalised confusion matrix as a PNG
beside it (the paper's Figs. 7 and 8), and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fermsca import cli, hostenv, inference, report

SPLITS = ("test", "validation", "train")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K] counts indexed [true class, predicted class]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def evaluate_split(classify: Callable[[np.ndarray], np.ndarray], split: Any,
                   class_names: Sequence[str]) -> dict:
    """Metrics of a classifier on a split (anything with `images` [N,48,48,1] and `targets` [N,K]).

    Args:
      classify: uint8 faces [N, 48, 48, 1] -> probabilities [N, K], e.g. an `inference.Classifier`.
      split: the examples; targets may be one-hot or vote distributions.
      class_names: K names, in target order.

    Returns:
      `report.confusion_metrics` of the predictions (accuracy, per-class accuracy and F1, macro
      F1, confusion matrix).
    """
    images = np.asarray(split.images)
    targets = np.asarray(split.targets)
    if len(images) == 0:
        raise ValueError("the split has no examples")
    if targets.ndim != 2 or targets.shape[1] != len(class_names) or len(targets) != len(images):
        raise ValueError(f"targets {targets.shape} do not match {len(images)} images and "
                         f"{len(class_names)} classes")
    probs = np.asarray(classify(images))
    cm = confusion_matrix(targets.argmax(-1), probs.argmax(-1), len(class_names))
    return report.confusion_metrics(cm, class_names)


def run(checkpoint_path: str, *, split: str = "test", manual_dir: str | None = None,
        data_dir: str | None = None, tta: bool = False,
        tta_shift: int = inference.DEFAULT_TTA_SHIFT, output: str | None = None,
        batch_size: int = 256, rebuild_data: bool = False) -> dict:
    """Evaluates a checkpoint on a split of its dataset; writes `output` (JSON) and a PNG beside it.

    With `tta`, the probabilities are averaged over `inference.tta_views(images, tta_shift)`: the
    image and its mirror, each also shifted by `tta_shift` pixels (0: the mirror only).
    `output` defaults to `default_output(...)` in the current directory.
    """
    if tta_shift < 0:
        raise ValueError(f"--tta_shift {tta_shift}: expected a number of pixels >= 0")
    from fermsca import config_schema, datasets  # TF and TFDS: only when a dataset is read

    loaded = inference.load(checkpoint_path)
    dataset_config = loaded.config.dataset
    missing = [f"config.{name}" for name in config_schema.FIELDS
               if name.startswith("dataset.") and name.split(".", 1)[1] not in dataset_config]
    if missing:
        raise cli.ConfigError(f"{loaded.path}: the checkpoint's config has no {', '.join(missing)} "
                              "(saved by an older fermsca); evaluate it with that version")
    dataset_config.train_subset = 0  # score the whole split, whatever subset trained the model
    if manual_dir is not None:
        dataset_config.manual_dir = manual_dir
    if data_dir is not None:
        dataset_config.data_dir = data_dir
    dataset_config.rebuild = rebuild_data
    data = datasets.load(dataset_config, required=(split,))
    if split not in data.splits:
        raise ValueError(f"dataset {data.name} has no {split!r} split (has "
                         f"{sorted(data.splits)})")
    if tuple(data.class_names) != loaded.class_names:
        raise ValueError(f"dataset {data.name} classes {list(data.class_names)} differ from the "
                         f"checkpoint's {list(loaded.class_names)}")
    classifier = loaded.classifier(tta=tta, tta_shift=tta_shift, batch_size=batch_size)
    metrics = evaluate_split(classifier, data.splits[split], loaded.class_names)
    results = {"checkpoint": loaded.path, "step": loaded.step, "dataset": data.name,
               "split": split, "source": data.source, "tta": tta,
               **({"tta_views": inference.num_tta_views(tta_shift), "tta_shift": tta_shift}
                  if tta else {}),
               "class_names": list(loaded.class_names), **metrics}
    write_results(results, output or default_output(data.name, split, tta, tta_shift))
    return results


def default_output(dataset: str, split: str, tta: bool,
                   tta_shift: int = inference.DEFAULT_TTA_SHIFT) -> str:
    suffix = "" if not tta else "_tta" if tta_shift == inference.DEFAULT_TTA_SHIFT \
        else f"_tta_shift{tta_shift}"
    return f"eval_{dataset}_{split}{suffix}.json"


def write_results(results: dict, output: str) -> str:
    """Writes the results JSON and its confusion-matrix PNG (same name, .png); returns the PNG path."""
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    figure = os.path.splitext(output)[0] + ".png"
    tta = f" ({tta_label(results)})" if results["tta"] else ""
    title = f"{results['dataset']} {results['split']}{tta}, acc {results['accuracy']:.4f}"
    report.plot_confusion_matrix(np.asarray(results["confusion_matrix"]),
                                 results["class_names"], figure, title=title)
    return figure


def tta_label(results: dict) -> str:
    """'TTA, 10 views' (or 'TTA' for results that predate `tta_views`)."""
    views = results.get("tta_views")
    return f"TTA, {views} views" if views else "TTA"


def summary_line(results: dict, output: str) -> str:
    tta = f" {tta_label(results)}" if results["tta"] else ""
    return (f"{results['dataset']} {results['split']}{tta}: "
            f"accuracy {results['accuracy']:.4f}, macro F1 {results['macro_f1']:.4f} on "
            f"{results['num_examples']} examples -> {output}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fermsca.evaluate", description=__doc__.split(
        "\n")[0])
    p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint folder")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--manual_dir", help="raw dataset files (replaces the checkpoint config's)")
    p.add_argument("--data_dir", help="TFDS data directory (replaces the checkpoint config's)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over flips and small shifts")
    p.add_argument("--tta_shift", type=int, default=inference.DEFAULT_TTA_SHIFT,
                   help="with --tta: the shift in pixels of the shifted views (0: the image and "
                        f"its mirror only; default {inference.DEFAULT_TTA_SHIFT})")
    p.add_argument("--output", help="results JSON (default eval_<dataset>_<split>[_tta|_tta_shiftN]"
                                    ".json); "
                                    "the confusion matrix PNG is written beside it")
    p.add_argument("--rebuild_data", action="store_true",
                   help="rebuild the stored dataset from --manual_dir (after the raw files changed)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    if args.tta_shift != inference.DEFAULT_TTA_SHIFT and not args.tta:
        p.error("--tta_shift goes with --tta")
    if args.tta_shift < 0:
        p.error(f"--tta_shift {args.tta_shift}: expected a number of pixels >= 0")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF only reads data: accelerators stay JAX's
    hostenv.enable_compilation_cache(hostenv.default_compilation_cache())

    def body() -> int:
        results = run(args.checkpoint, split=args.split, manual_dir=args.manual_dir,
                      data_dir=args.data_dir, tta=args.tta, tta_shift=args.tta_shift,
                      output=args.output,
                      batch_size=args.batch_size, rebuild_data=args.rebuild_data)
        output = args.output or default_output(results["dataset"], results["split"],
                                               results["tta"], args.tta_shift)
        print(summary_line(results, output))
        return 0

    return cli.run(body, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
