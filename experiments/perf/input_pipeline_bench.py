"""Steady-state throughput of the training input pipeline on a FER+-sized synthetic split.

    python -m experiments.perf.input_pipeline_bench --seconds=10

Prints `N img/s` and writes it, with the command and the machine, to --output as JSON.
"""

import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from fermsca import input_pipeline

_SECONDS = flags.DEFINE_float("seconds", 10.0, "How long to measure, after the warm-up.")
_WARMUP = flags.DEFINE_float("warmup", 2.0, "Seconds of batches drawn before measuring.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 28000, "Examples in the synthetic split.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 8, "Classes in the synthetic split.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_SAMPLE_LABELS = flags.DEFINE_bool(
    "sample_labels", True, "Draw one-hot targets from soft labels, as for FER+."
)
_OUTPUT = flags.DEFINE_string(
    "output",
    str(Path(__file__).resolve().parents[1] / "results" / "input_pipeline_bench.json"),
    "Where to write the result as JSON; empty to skip.",
)


@dataclasses.dataclass(frozen=True)
class SyntheticSplit:
    images: np.ndarray
    targets: np.ndarray
    sample_labels: bool


def _synthetic_split() -> SyntheticSplit:
    rng = np.random.default_rng(0)
    n, k = _NUM_EXAMPLES.value, _NUM_CLASSES.value
    images = rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)
    targets = rng.dirichlet(np.ones(k), n).astype(np.float32)
    return SyntheticSplit(images, targets, _SAMPLE_LABELS.value)


def _images_per_second(iterator, seconds: float) -> tuple[float, int]:
    images, begin = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - begin) < seconds:
        images += len(next(iterator)["image"])
    return images / elapsed, images


def main(argv):
    del argv
    split = _synthetic_split()
    iterator = input_pipeline.train_iterator(
        split, global_batch_size=_BATCH_SIZE.value, seed=0, process_index=0, process_count=1
    )
    _images_per_second(iterator, _WARMUP.value)
    rate, images = _images_per_second(iterator, _SECONDS.value)
    print(f"{rate:.0f} img/s")
    if _OUTPUT.value:
        result = {
            "command": shlex.join(["python", *sys.argv]),
            "images_per_second": round(rate),
            "images_measured": images,
            "seconds": _SECONDS.value,
            "num_examples": _NUM_EXAMPLES.value,
            "num_classes": _NUM_CLASSES.value,
            "batch_size": _BATCH_SIZE.value,
            "sample_labels": _SAMPLE_LABELS.value,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            },
        }
        path = Path(_OUTPUT.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
