"""Choosing test faces that the Haar cascade finds with a clear margin.

A face that the cascade finds only just (at one scale step, with few neighbouring hits) may be
missed on another CPU: OpenCV's cascade takes other code paths on AVX2 and AVX-512 machines. Tests
that need a detection use faces that are still found when the search is made coarser or stricter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from fermsca import faces

SCALE_FACTORS = (1.05, 1.1, 1.2, 1.3)
MIN_NEIGHBORS = (3, 5, 9)


def _iou(a, b) -> float:
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def found_with_margin(image: np.ndarray, min_size: int = 30, where=None, min_iou: float = 0.5) -> bool:
    """True when a face is found at every scale factor and neighbour count above (and, with
    `where` = (x, y, w, h), the largest one overlaps it by at least `min_iou` each time)."""
    for s in SCALE_FACTORS:
        for n in MIN_NEIGHBORS:
            boxes = faces.detect_faces(image, scale_factor=s, min_neighbors=n, min_size=min_size)
            if not boxes or (where is not None and _iou(boxes[0], where) < min_iou):
                return False
    return True


def clear_faces(candidates: Iterable[np.ndarray], render: Callable[[np.ndarray, int], np.ndarray],
                count: int, draws: int = 2, min_size: int = 30, where=None,
                min_iou: float = 0.5) -> list[np.ndarray]:
    """Up to `count` of `candidates` whose renderings (`render(face, draw)` for each of `draws`
    draws, e.g. noise seeds) are all found with a clear margin (`found_with_margin`)."""
    chosen = []
    for face in candidates:
        if all(found_with_margin(render(face, d), min_size, where, min_iou) for d in range(draws)):
            chosen.append(face)
            if len(chosen) == count:
                break
    return chosen
