"""Annotations drawn on uint8 RGB images: face boxes, labels with scores and track ids, and panels
of per-class probability bars. `draw_annotations` returns a new array; the input is left as it is.

Used for `--annotate`, `--annotate-video` (`fermsca.predict`) and the live window (`fermsca.webcam`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# RGB colours of tracks 1, 2, ... (faces without a track are drawn in the first).
PALETTE = ((0, 255, 0), (255, 160, 0), (0, 200, 255), (255, 80, 200), (255, 255, 0),
           (170, 130, 255))
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_annotations(rgb: np.ndarray, records: Sequence[dict], *, bars: bool = False) -> np.ndarray:
    """A copy of an RGB image with each face record's box, label and score drawn on it, its track
    id ("#3") when it has one, and with `bars` a panel of its per-class probabilities."""
    out = np.ascontiguousarray(rgb).copy()
    thickness = max(1, round(min(out.shape[:2]) / 250))
    font_scale = max(0.4, thickness * 0.5)
    faces = [r for r in records if "box" in r]
    colours = [PALETTE[(r.get("track", 1) - 1) % len(PALETTE)] for r in faces]
    taken = []  # face boxes, labels and panels: what a panel should not cover
    for record, colour in zip(faces, colours, strict=True):
        x, y, w, h = record["box"]
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, thickness)
        text = f"{record['label']} {record['score']:.2f}"
        if "track" in record:
            text = f"#{record['track']} {text}"
        (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, thickness)
        top = y - th - base - 2 if y - th - base - 2 >= 0 else y + h
        left = max(0, min(x, out.shape[1] - tw - 2))  # inside the image where it fits
        cv2.rectangle(out, (left, top), (left + tw + 2, top + th + base + 2), colour, -1)
        cv2.putText(out, text, (left + 1, top + th + 1), _FONT, font_scale, (0, 0, 0), thickness,
                    cv2.LINE_AA)
        taken += [_rect(record["box"]), (left, top, left + tw + 2, top + th + base + 2)]
    if bars:
        for record, colour in zip(faces, colours, strict=True):
            taken.append(_draw_bars(out, record, colour, taken))
    return out


def _rect(box: Sequence[int]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return x, y, x + w, y + h


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Pixels shared by two rectangles (x0, y0, x1, y1)."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _draw_bars(out: np.ndarray, record: dict, colour: tuple[int, int, int],
               taken: Sequence[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """One row per class (name, bar as long as its probability) beside the face box; the top
    class's bar in the track's colour, the others grey, on a darkened panel. The panel goes right
    of the box, left, below or above: of the places inside the image, the one that covers the
    least of `taken` (boxes, labels, panels), the first on a tie. Returns (x0, y0, x1, y1)."""
    height, width = out.shape[:2]
    scale = max(0.35, min(height, width) / 1200)
    probs = record["probabilities"]
    names = [n[:9] for n in probs]
    (name_w, text_h), base = max((cv2.getTextSize(n, _FONT, scale, 1) for n in names),
                                 key=lambda size: size[0][0])
    row = text_h + base + 3
    bar_w = 5 * row
    panel_w, panel_h = name_w + bar_w + 9, row * len(names) + 4
    x, y, w, h = record["box"]
    places = [(x + w + 4, y), (x - 4 - panel_w, y), (x, y + h + 4), (x, y - 4 - panel_h)]
    inside = [(px, py) for px, py in places
              if px >= 0 and py >= 0 and px + panel_w <= width and py + panel_h <= height]
    if inside:
        x0, y0 = min(inside, key=lambda p: sum(
            _overlap((p[0], p[1], p[0] + panel_w, p[1] + panel_h), r) for r in taken))
    else:  # a panel larger than the free space: keep it in the image as far as it goes
        x0, y0 = max(0, min(width - panel_w, x)), max(0, min(height - panel_h, y))
    panel = out[y0:y0 + panel_h, x0:x0 + panel_w]
    panel //= 3
    top = max(probs, key=probs.get)
    for k, (name, full) in enumerate(zip(names, probs, strict=True)):
        baseline = y0 + 2 + (k + 1) * row - base - 1
        cv2.putText(out, name, (x0 + 3, baseline), _FONT, scale, (235, 235, 235), 1, cv2.LINE_AA)
        bx = x0 + name_w + 6
        cv2.rectangle(out, (bx, baseline - text_h), (bx + round(probs[full] * bar_w), baseline),
                      colour if full == top else (170, 170, 170), -1)
    return x0, y0, x0 + panel_w, y0 + panel_h
