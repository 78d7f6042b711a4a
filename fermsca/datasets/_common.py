"""Shared pieces of the dataset builders: the input error type and image readers."""

from __future__ import annotations

import os

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
