"""Datasets: TFDS builders for FER+, CK+ and the built-in synthetic faces, and `load`.

`load(config.dataset)` builds the TFDS dataset if needed, reads the splits into NumPy, applies the
label mode (FER+) or evaluation protocol (CK+) and returns a `Dataset`. See README.md here for the
source layouts, manual download steps, label modes and measured counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fermsca.datasets import ckplus, ferplus, labels, synthetic_faces
from fermsca.datasets._common import IMAGE_SIZE, DataError, source_fingerprint

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "Dataset",
    "IMAGE_SIZE",
    "SPLITS",
    "Split",
    "describe",
    "load",
]

SPLITS = ("train", "validation", "test")
CLASS_NAMES = {
    "synthetic_faces": synthetic_faces.CLASS_NAMES,
    "ferplus": labels.EMOTIONS,
    "ckplus": ckplus.CLASS_NAMES,
}

_DEFAULTS = {
    "name": "synthetic_faces",
    "data_dir": None,
    "manual_dir": None,
    "label_mode": "majority",
    "builder_config": "official",
    "frames_per_sequence": ckplus.DEFAULT_FRAMES,
    "allow_center_crop": False,
    "protocol": "kfold",
    "num_folds": 10,
    "fold": 0,
    "test_fraction": 0.1,
    "split_seed": 0,
    "rebuild": False,
}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory. `counts`: {"total", "kept", "dropped_<rule>"...}, total = kept + drops."""

    images: np.ndarray  # uint8 [N, 48, 48, 1]
    targets: np.ndarray  # float32 [N, K]; rows sum to 1 (one-hot for hard labels)
    sample_labels: bool  # draw a one-hot label from `targets` each time an example is drawn
    counts: dict[str, int]
    file_names: np.ndarray  # [N] str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in memory: its name, class names (target order) and splits."""

    name: str
    class_names: tuple[str, ...]
    splits: dict[str, Split]  # keys among SPLITS, only those present
    source: dict | None = None  # the raw files' fingerprint (`_common.source_fingerprint`)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _option(config: ml_collections.ConfigDict, key: str):
    value = config.get(key, None)
    return _DEFAULTS[key] if value is None else value


def _one_hot(labels_: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels_]


def _read(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return {
        key: np.array([v.decode() for v in value], dtype=str) if value.dtype.kind in "OS" else value
        for key, value in data.items()
    }


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None, entries=(),
             rebuild: bool = False, is_label_file=lambda name: False) -> dict | None:
    """Builds `builder` from `manual_dir` unless it is built already; returns the build's source
    fingerprint (`source_fingerprint`; None for built-in sets).

    A stored build is used only when `manual_dir` is unset or still fingerprints the same: changed,
    added or removed raw files, or another folder, are a DataError that says how to rebuild.
    """
    fingerprint = (None if manual_dir is None else
                   source_fingerprint(manual_dir, entries, is_label_file))
    if builder.is_prepared() and not rebuild:
        stored = dict(builder.info.metadata or {}).get("source")
        if fingerprint is not None and (stored or {}).get("digest") != fingerprint["digest"]:
            raise DataError(_stale_message(builder, stored, fingerprint))
        return stored or fingerprint
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    if rebuild:  # regenerate from the manual files, e.g. after they changed or a split was added
        download_config.download_mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    if fingerprint is not None:
        builder.info.metadata["source"] = fingerprint
    try:
        builder.download_and_prepare(download_config=download_config)
    except AssertionError as error:  # TFDS: manual directory missing or empty
        raise DataError(f"{builder.name}: {error}") from None
    return fingerprint


def _stale_message(builder: tfds.core.DatasetBuilder, stored: dict | None, found: dict) -> str:
    built = ("before source fingerprints were recorded" if not stored else
             f"from {stored['manual_dir']} ({stored['files']} files, digest {stored['digest'][:12]})")
    return (
        f"{builder.data_path}: this {builder.name} build was made {built}, but manual_dir "
        f"{found['manual_dir']} now holds {found['files']} files, digest {found['digest'][:12]}: "
        "the raw files changed or another folder was given. Rebuild it with "
        "--config.dataset.rebuild=True (evaluate: --rebuild_data), or pass another "
        "--config.dataset.data_dir (evaluate: --data_dir)."
    )


def _load_synthetic(config) -> Dataset:
    builder = synthetic_faces.SyntheticFaces(data_dir=_option(config, "data_dir"))
    _prepare(builder, None)
    splits = {}
    for split in SPLITS:
        data = _read(builder, split)
        n = len(data["label"])
        splits[split] = Split(
            images=data["image"],
            targets=_one_hot(data["label"], len(synthetic_faces.CLASS_NAMES)),
            sample_labels=False,
            counts={"total": n, "kept": n},
            file_names=data["file_name"],
        )
    return Dataset("synthetic_faces", synthetic_faces.CLASS_NAMES, splits)


def build_ferplus(manual_dir: str | None, data_dir: str | None, rebuild: bool = False):
    """The FER+ TFDS builder, built from `manual_dir` if needed (fingerprint-checked as in `load`)."""
    builder = ferplus.Ferplus(data_dir=data_dir)
    _prepare(builder, manual_dir, ferplus.SOURCE_ENTRIES, rebuild, ferplus.is_label_file)
    return builder


def _load_ferplus(config, required: Sequence[str]) -> Dataset:
    label_mode = _option(config, "label_mode")
    labels.check_mode(label_mode)
    manual_dir = _option(config, "manual_dir")
    builder = ferplus.Ferplus(data_dir=_option(config, "data_dir"))
    rebuild = bool(_option(config, "rebuild"))
    if not rebuild and manual_dir and builder.is_prepared():
        missing = [s for s in required if s not in builder.info.splits]
        if any(s in ferplus.find_sources(manual_dir) for s in missing):
            logging.info("FER+: rebuilding to add split(s) %s found in %s", missing, manual_dir)
            rebuild = True
    source = _prepare(builder, manual_dir, ferplus.SOURCE_ENTRIES, rebuild, ferplus.is_label_file)
    for split in required:
        if split not in builder.info.splits:
            raise DataError(ferplus.missing_split_message(split, manual_dir))
    at_source = ferplus.source_drops(builder.info.metadata)  # {split: {rule: rows}} left out when built
    splits = {}
    for split in SPLITS:
        if split not in builder.info.splits:
            continue
        data = _read(builder, split)
        # Validation and test are always scored against majority labels.
        mode = label_mode if split == "train" else "majority"
        keep, targets, counts = labels.apply_label_mode(data["votes"], mode)
        for rule, rows in at_source.get(split, {}).items():
            counts["total"] += rows
            counts[f"dropped_{rule}"] = rows
        splits[split] = Split(
            images=data["image"][keep],
            targets=targets,
            sample_labels=mode == "probability",
            counts=counts,
            file_names=data["file_name"][keep],
        )
    return Dataset("ferplus", labels.EMOTIONS, splits, source)


def _load_ckplus(config) -> Dataset:
    name = _option(config, "builder_config")
    frames = int(_option(config, "frames_per_sequence"))
    allow_center_crop = bool(_option(config, "allow_center_crop"))
    if frames < 1:
        raise ValueError(f"frames_per_sequence must be >= 1, got {frames}")
    if name == "official":
        builder_config = ckplus.official_config(max(frames, ckplus.DEFAULT_FRAMES))
    elif name == "ckplus48":
        builder_config = name
    else:
        raise ValueError(f"unknown CK+ builder_config {name!r}; expected 'official' or 'ckplus48'")
    builder = ckplus.Ckplus(
        config=builder_config,
        data_dir=_option(config, "data_dir"),
        allow_center_crop=allow_center_crop,
    )
    manual_dir = _option(config, "manual_dir")
    layout = "official" if name == "official" else "ckplus48"
    entries = [] if manual_dir is None else ckplus.source_entries(manual_dir, layout)
    source = _prepare(builder, manual_dir, entries, bool(_option(config, "rebuild")),
                      ckplus.is_label_file)
    data = _read(builder, "train")
    if data["center_cropped"].any() and not allow_center_crop:
        failed = data["file_name"][data["center_cropped"]]
        raise DataError(
            f"ckplus: the stored dataset holds {len(failed)} centre crop(s) where no face was "
            "found (built with allow_center_crop); set allow_center_crop to use them:\n  "
            + "\n  ".join(failed)
        )
    selected = np.flatnonzero(data["frame_rank"] < frames)
    protocol = _option(config, "protocol")
    seed = int(_option(config, "split_seed"))
    if protocol == "kfold":
        parts = ckplus.kfold_indices(
            data["subject"][selected],
            num_folds=int(_option(config, "num_folds")),
            fold=int(_option(config, "fold")),
            seed=seed,
        )
    elif protocol == "random":
        parts = ckplus.random_indices(len(selected), float(_option(config, "test_fraction")), seed)
    else:
        raise ValueError(f"unknown CK+ protocol {protocol!r}; expected 'kfold' or 'random'")
    splits = {}
    for split, local in parts.items():
        index = selected[local]
        splits[split] = Split(
            images=data["image"][index],
            targets=_one_hot(data["label"][index], len(ckplus.CLASS_NAMES)),
            sample_labels=False,
            counts={
                "total": len(index),
                "kept": len(index),
                "center_cropped": int(data["center_cropped"][index].sum()),
            },
            file_names=data["file_name"][index],
        )
    return Dataset("ckplus", ckplus.CLASS_NAMES, splits, source)


def load(config: ml_collections.ConfigDict, required: Sequence[str] = ("train", "validation")) -> Dataset:
    """Builds (if needed) and reads the dataset named by `config.name` (the `dataset` sub-config).

    Fields (defaults when absent): name ('synthetic_faces' | 'ferplus' | 'ckplus'), data_dir,
    manual_dir, label_mode (FER+ train split; validation / test always use majority labels),
    builder_config and frames_per_sequence, allow_center_crop, protocol ('kfold' | 'random'),
    num_folds, fold, test_fraction, split_seed (CK+). Raises DataError for bad or missing input,
    naming the file, row or folder to fix.
    """
    unknown = [s for s in required if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected among {SPLITS}")
    name = _option(config, "name")
    if name == "synthetic_faces":
        dataset = _load_synthetic(config)
    elif name == "ferplus":
        dataset = _load_ferplus(config, required)
    elif name == "ckplus":
        dataset = _load_ckplus(config)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(CLASS_NAMES)}")
    for split, part in dataset.splits.items():
        logging.info("%s %s: %s", name, split, part.counts)
    return dataset


def describe(dataset: Dataset) -> str:
    """Per-split kept / dropped counts and per-class counts (argmax of the target), for logs."""
    lines = [f"{dataset.name}: {dataset.num_classes} classes ({', '.join(dataset.class_names)})"]
    for split, part in dataset.splits.items():
        per_class = np.bincount(part.targets.argmax(-1), minlength=dataset.num_classes)
        extra = {k: v for k, v in part.counts.items() if k not in ("total", "kept") and v}
        line = f"  {split}: {part.counts['kept']} of {part.counts['total']} kept"
        if extra:
            line += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
        if part.sample_labels:
            line += ", labels sampled from targets"
        line += "; per class " + " ".join(
            f"{n}={c}" for n, c in zip(dataset.class_names, per_class, strict=True)
        )
        lines.append(line)
    return "\n".join(lines)
