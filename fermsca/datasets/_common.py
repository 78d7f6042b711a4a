"""What every dataset module shares: the in-memory `Dataset`, the input error type, image readers,
and building a TFDS builder from raw files only while those files are unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # imported where builders are used, so the error type loads without TFDS
    import tensorflow_datasets as tfds

IMAGE_SIZE = 48
SPLITS = ("train", "validation", "test")

# PIL modes that convert to 8-bit grayscale without losing meaning.
_GRAYSCALE_CONVERTIBLE = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class DataError(ValueError):
    """Bad input data; the message names the file and the row or field that is wrong."""


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
    source: dict | None = None  # the raw files' fingerprint (`source_fingerprint`)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


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


def read_grayscale(path: str | os.PathLike, *, size: int | None = IMAGE_SIZE) -> np.ndarray:
    """Reads an image file as uint8 [H, W]; with `size`, the image must be `size` x `size`.

    Raises DataError naming `path` when the file is missing, cannot be decoded, is in a mode with no
    8-bit grayscale equivalent (e.g. 16-bit or float images), or has the wrong size.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file is missing")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode not in _GRAYSCALE_CONVERTIBLE:
                raise DataError(f"{path}: image mode {mode!r} cannot be converted to 8-bit grayscale")
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{path}: image cannot be read ({error})") from error
    if size is not None and pixels.shape != (size, size):
        height, width = pixels.shape
        raise DataError(f"{path}: image is {width}x{height}, expected {size}x{size}")
    return pixels


def source_fingerprint(manual_dir: str, entries: Sequence[str],
                       is_label_file: Callable[[str], bool] = lambda name: False) -> dict:
    """What a build was made from: the files under `manual_dir`/<entry> for each entry present.

    Returns {"manual_dir", "files", "bytes", "digest"}; `digest` is a SHA-256 over every file's
    relative name and size, and over the content of the label files (`is_label_file(name)`), so renamed,
    added, removed, resized or relabelled files change it. Raises DataError when `manual_dir` is
    not a folder.
    """
    manual_dir = os.path.abspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise DataError(f"{manual_dir}: manual_dir is not a folder")
    files = []
    for entry in entries:
        top = os.path.join(manual_dir, entry)
        if os.path.isfile(top):
            files.append(entry)
        for folder, subfolders, names in os.walk(top):
            subfolders.sort()
            files += [os.path.relpath(os.path.join(folder, n), manual_dir) for n in names]
    digest, total = hashlib.sha256(), 0
    for name in sorted(files):
        path = os.path.join(manual_dir, name)
        size = os.path.getsize(path)
        total += size
        digest.update(f"{name}\0{size}\0".encode())
        if is_label_file(name):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return {"manual_dir": manual_dir, "files": len(files), "bytes": total,
            "digest": digest.hexdigest()}


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None, entries: Sequence[str] = (),
            rebuild: bool = False,
            is_label_file: Callable[[str], bool] = lambda name: False) -> dict | None:
    """Builds `builder` from `manual_dir` unless it is built already; returns the build's source
    fingerprint (`source_fingerprint` of `entries`; None for built-in sets).

    A stored build is used only when `manual_dir` is unset or still fingerprints the same: changed,
    added or removed raw files, or another folder, are a DataError that says how to rebuild.
    """
    import tensorflow_datasets as tfds

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


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Every feature of a built split as NumPy arrays; text features as str arrays."""
    import tensorflow_datasets as tfds

    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return {
        key: np.array([v.decode() for v in value], dtype=str) if value.dtype.kind in "OS" else value
        for key, value in data.items()
    }
