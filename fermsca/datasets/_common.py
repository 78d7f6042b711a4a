"""Shared pieces of the dataset builders: the input error type and image readers."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 48

# PIL modes that convert to 8-bit grayscale without losing meaning.
_GRAYSCALE_CONVERTIBLE = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class DataError(ValueError):
    """Bad input data; the message names the file and the row or field that is wrong."""


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
