"""Datasets: TFDS builders for FER+, CK+ and the built-in synthetic faces, and `load`.

Each dataset module owns its loading (`<module>.load(config, required)`): its builder, FER+'s label
mode or CK+'s evaluation protocol, and its report. `load(config.dataset)` picks the module by name
and applies `train_subset`. See README.md here for the source layouts, manual download steps,
label modes and measured counts.

The builder modules (and with them tensorflow_datasets) are imported when a dataset is loaded or
one of them is named (`datasets.ferplus`); `CLASS_NAMES` and the dataset names are plain data, so
code that only needs them (a config check, a benchmark on random images) runs without TFDS. A
dataset written by `packed` (`config.dataset.packed_file`) is read without TFDS or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections
from absl import logging

from fermsca.datasets import labels
from fermsca.datasets._common import (
    IMAGE_SIZE,
    SPLITS,
    DataError,
    Dataset,
    Split,
    describe,
    source_fingerprint,
)

if TYPE_CHECKING:
    from fermsca.datasets import ckplus, ferplus, synthetic_faces  # noqa: F401

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "Dataset",
    "IMAGE_SIZE",
    "SPLITS",
    "Split",
    "describe",
    "load",
    "source_fingerprint",
]

_BUILDER_MODULES = ("synthetic_faces", "ferplus", "ckplus")
# Each builder module's CLASS_NAMES (they take them from `labels`), readable without loading a builder.
CLASS_NAMES = {
    "synthetic_faces": labels.EMOTIONS,
    "ferplus": labels.EMOTIONS,
    "ckplus": labels.CKPLUS_EMOTIONS,
}


def __getattr__(name: str):
    """The builder modules, imported on first use (PEP 562)."""
    if name in _BUILDER_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(config: ml_collections.ConfigDict, required: Sequence[str] = ("train", "validation")) -> Dataset:
    """Builds (if needed) and reads the dataset named by `config.name` (the `dataset` sub-config of
    configs/default.py, every field present), or reads `config.packed_file` (`packed`) instead.

    `required`: splits that must exist (FER+ builds only the splits its files provide). With
    `config.train_subset` > 0 the train split keeps its first `train_subset` examples. Raises
    DataError for bad or missing input, naming the file, row or folder to fix.
    """
    unknown = [s for s in required if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected among {SPLITS}")
    if config.name not in _BUILDER_MODULES:
        raise ValueError(f"unknown dataset {config.name!r}; expected one of {sorted(_BUILDER_MODULES)}")
    if config.packed_file:  # built elsewhere: no builder, no TFDS
        from fermsca.datasets import packed

        dataset = packed.read(config.packed_file, config)
        missing = [s for s in required if s not in dataset.splits]
        if missing:
            raise DataError(f"{config.packed_file}: no {'/'.join(missing)} split (it holds "
                            f"{'/'.join(dataset.splits)})")
    else:
        dataset = importlib.import_module(f"{__name__}.{config.name}").load(config, required)
    if config.train_subset and "train" in dataset.splits:
        train = _first(dataset.splits["train"], config.train_subset)
        dataset = dataclasses.replace(dataset, splits={**dataset.splits, "train": train})
    for split, part in dataset.splits.items():
        logging.info("%s %s: %s", dataset.name, split, part.counts)
    return dataset


def _first(split: Split, n: int) -> Split:
    """The first `n` examples of a split; its counts record `train_subset`."""
    counts = {**split.counts, "train_subset": int(min(n, len(split.images)))}
    return dataclasses.replace(split, images=split.images[:n], targets=split.targets[:n],
                               file_names=split.file_names[:n], counts=counts)
