"""Face detection and cropping: OpenCV's frontal-face Haar cascade, square crops resized to 48x48.

Boxes are (x, y, w, h) in pixels of the image they were found in, x to the right and y down.

Margins: Haar boxes run from the eyebrows to the chin. On FER+ validation faces upscaled 4x and pasted
into a larger canvas, the box found spans a median 0.98 of the FER image side (300 faces measured), so
a crop of the box itself (margin 0) matches the framing the FER+ model was trained on. A margin m adds
m times the box side on every side.

The cascade file ships with `opencv-python-headless` 4.x (`cv2.data.haarcascades`). OpenCV 5 moved
`CascadeClassifier` to opencv-contrib, and its 5.0 wheels carry no cascade files.
"""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h

CASCADE_FILE = "haarcascade_frontalface_default.xml"
FACE_SIZE = 48


class FaceDetectorError(RuntimeError):
    """The Haar cascade cannot be loaded."""


def cascade_path() -> str:
    """Path of the frontal-face cascade shipped with OpenCV; FaceDetectorError if there is none."""
    if not hasattr(cv2, "CascadeClassifier"):
        raise FaceDetectorError(
            f"OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV 5 moved it to "
            "opencv-contrib); install opencv-python-headless>=4.14,<5")
    path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
    if not os.path.isfile(path):
        raise FaceDetectorError(
            f"{path}: face cascade missing from OpenCV {cv2.__version__}; install "
            "opencv-python-headless>=4.14,<5, whose wheels ship it")
    return path


@functools.cache
def _cascade() -> cv2.CascadeClassifier:
    path = cascade_path()
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FaceDetectorError(f"{path}: OpenCV could not load the face cascade")
    return cascade


def to_gray(image: np.ndarray, order: str = "rgb") -> np.ndarray:
    """uint8 [H, W] grayscale of a [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8 image.

    `order` is the colour order of 3- and 4-channel images: "rgb" (Pillow) or "bgr" (OpenCV).
    The weights are ITU-R 601 (0.299 R + 0.587 G + 0.114 B), as Pillow's "L" mode.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
    if image.shape[2] == 1:
        return image[:, :, 0]
    if order not in ("rgb", "bgr"):
        raise ValueError(f"order must be 'rgb' or 'bgr', got {order!r}")
    codes = {(3, "rgb"): cv2.COLOR_RGB2GRAY, (3, "bgr"): cv2.COLOR_BGR2GRAY,
             (4, "rgb"): cv2.COLOR_RGBA2GRAY, (4, "bgr"): cv2.COLOR_BGRA2GRAY}
    return cv2.cvtColor(np.ascontiguousarray(image), codes[(image.shape[2], order)])


def detect_faces(gray: np.ndarray, *, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size: int = 30, max_side: int = 1280) -> list[Box]:
    """Frontal faces in a grayscale image, largest first.

    Args:
      gray: uint8 [H, W].
      scale_factor, min_neighbors: `CascadeClassifier.detectMultiScale` settings.
      min_size: smallest face side in pixels of `gray`.
      max_side: images whose longer side exceeds this are searched at that size (faster on large
        photos); boxes are mapped back to `gray`'s pixels.

    Returns:
      (x, y, w, h) boxes in `gray`'s pixels, by decreasing area, then top-to-bottom, left-to-right.
    """
    gray = np.asarray(gray)
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected uint8 [H, W], got {gray.dtype} {gray.shape}")
    height, width = gray.shape
    scale = min(1.0, max_side / max(height, width))
    small = gray
    if scale < 1.0:
        small = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    min_side = max(1, round(min_size * scale))
    found = _cascade().detectMultiScale(small, scaleFactor=scale_factor,
                                        minNeighbors=min_neighbors, minSize=(min_side, min_side))
    boxes = []
    for x, y, w, h in np.asarray(found, dtype=np.float64).reshape(-1, 4):
        x0, y0 = round(x / scale), round(y / scale)
        x1, y1 = min(width, round((x + w) / scale)), min(height, round((y + h) / scale))
        boxes.append((int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[1], b[0]))


def square_box(box: Box, margin: float = 0.0) -> Box:
    """The square crop of a face box: side max(w, h) * (1 + 2 * margin), same centre.

    May extend past the image; `crop_face` repeats edge pixels there.
    """
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise ValueError(f"box {box} has no area")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    side = max(1, round(max(w, h) * (1.0 + 2.0 * margin)))
    cx, cy = x + w / 2.0, y + h / 2.0
    return round(cx - side / 2.0), round(cy - side / 2.0), side, side


def _resize(square: np.ndarray, size: int) -> np.ndarray:
    if square.shape[0] == size:
        return square.copy()
    # Area averaging when shrinking (no aliasing), bilinear when enlarging.
    method = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=method)


def crop_face(gray: np.ndarray, box: Box, margin: float = 0.0, size: int = FACE_SIZE) -> np.ndarray:
    """The square around `box` (see `square_box`), resized to uint8 [size, size].

    Parts of the square outside the image repeat the nearest edge pixel, so the face stays centred.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a grayscale image [H, W], got {gray.shape}")
    height, width = gray.shape
    x, y, side, _ = square_box(box, margin)
    if x >= width or y >= height or x + side <= 0 or y + side <= 0:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + side, width), min(y + side, height)
    inside = gray[y0:y1, x0:x1]
    pads = ((y0 - y, y + side - y1), (x0 - x, x + side - x1))
    square = np.pad(inside, pads, mode="edge") if any(p for pair in pads for p in pair) else inside
    return _resize(np.ascontiguousarray(square), size)


def center_box(shape: tuple[int, ...], fraction: float = 1.0) -> Box:
    """The centred square of an image of shape (H, W, ...), `fraction` of its shorter side."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    height, width = shape[:2]
    side = max(1, round(min(height, width) * fraction))
    return (width - side) // 2, (height - side) // 2, side, side


def center_crop(gray: np.ndarray, size: int = FACE_SIZE, fraction: float = 1.0) -> np.ndarray:
    """The centred square (`center_box`) of a grayscale image, resized to uint8 [size, size]."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or min(gray.shape) == 0:
        raise ValueError(f"expected a non-empty grayscale image [H, W], got {gray.shape}")
    x, y, side, _ = center_box(gray.shape, fraction)
    return _resize(np.ascontiguousarray(gray[y:y + side, x:x + side]), size)
