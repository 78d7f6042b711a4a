"""Faces followed across video frames: IoU matching of boxes and smoothed class probabilities.

A detector finds faces afresh in every frame, in no stable order, and a classifier's output for
one face jitters from frame to frame. `update` carries a `TrackerState` from one frame to the
next: each face box of the new frame is matched to a track of the previous frames by
intersection over union (Hungarian matching, `scipy.optimize.linear_sum_assignment`); matched
boxes keep their track's id, unmatched ones start a new track, and a track without a match for
more than `max_missed` frames in a row is dropped. Each track's probabilities are an exponential
moving average (`ema`) of its faces' probabilities, so its label does not flicker.

Everything here is a pure function of its arguments; boxes are (x, y, w, h) in pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize

Box = tuple[int, int, int, int]  # x, y, w, h

# Weight of the newest frame in the moving average: a step change in a face's probabilities
# shows 30% in the first frame and 90% after 7 frames (0.7^7 = 0.08), about 0.2 s at 30 frames/s.
DEFAULT_SMOOTHING = 0.3
DEFAULT_MIN_IOU = 0.3  # a box overlapping a track's last box less than this starts a new track
DEFAULT_MAX_MISSED = 5  # frames in a row a track may go unmatched before it is dropped


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (x, y, w, h); 0 when either has no area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


def iou_matrix(boxes_a: Sequence[Box], boxes_b: Sequence[Box]) -> np.ndarray:
    """[len(a), len(b)] float64 IoU of every pair."""
    out = np.zeros((len(boxes_a), len(boxes_b)), np.float64)
    for i, a in enumerate(boxes_a):
        for j, b in enumerate(boxes_b):
            out[i, j] = iou(a, b)
    return out


def match(overlaps: np.ndarray, min_iou: float = DEFAULT_MIN_IOU) -> list[tuple[int, int]]:
    """Pairs (row, column) of the assignment with the largest total IoU, without pairs below
    `min_iou`; each row and each column is used at most once. Sorted by row."""
    if overlaps.size == 0:
        return []
    rows, cols = optimize.linear_sum_assignment(overlaps, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if overlaps[r, c] >= min_iou]


def ema(previous: np.ndarray, current: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average: smoothing * current + (1 - smoothing) * previous.

    `smoothing` in (0, 1] is the weight of the newest value; 1 keeps `current` unchanged.
    """
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    return smoothing * np.asarray(current, np.float64) + (1.0 - smoothing) * np.asarray(
        previous, np.float64)


@dataclasses.dataclass(frozen=True)
class Track:
    """One face followed over frames: its id, last matched box and smoothed probabilities."""

    id: int
    box: Box
    probabilities: np.ndarray  # float64 [K], the moving average
    missed: int = 0  # frames in a row without a matching box


@dataclasses.dataclass(frozen=True)
class TrackerState:
    """The live tracks (oldest first) and the id the next new track gets (ids start at 1)."""

    tracks: tuple[Track, ...] = ()
    next_id: int = 1


def update(state: TrackerState, boxes: Sequence[Box], probabilities: np.ndarray, *,
           smoothing: float = DEFAULT_SMOOTHING, min_iou: float = DEFAULT_MIN_IOU,
           max_missed: int = DEFAULT_MAX_MISSED) -> tuple[TrackerState, list[Track]]:
    """Advances the tracks by one frame.

    Args:
      state: the tracks after the previous frame (`TrackerState()` before the first).
      boxes: the faces of this frame, (x, y, w, h) each.
      probabilities: [len(boxes), K] class probabilities of those faces.
      smoothing: weight of this frame in each track's moving average (`ema`); 1 turns it off.
      min_iou: the least IoU between a box and a track's last box for them to match.
      max_missed: a track unmatched in more than this many frames in a row is dropped.

    Returns:
      (the new state, the track of each box in `boxes` order, its probabilities smoothed).
    """
    if max_missed < 0:
        raise ValueError(f"max_missed must be >= 0, got {max_missed}")
    probabilities = np.asarray(probabilities, np.float64)
    if len(probabilities) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(probabilities)} rows of probabilities")
    pairs = match(iou_matrix([t.box for t in state.tracks], boxes), min_iou)
    box_of_track = dict(pairs)
    assigned: list[Track | None] = [None] * len(boxes)
    tracks = []
    for t, track in enumerate(state.tracks):
        b = box_of_track.get(t)
        if b is None:
            if track.missed < max_missed:
                tracks.append(dataclasses.replace(track, missed=track.missed + 1))
            continue
        moved = Track(track.id, tuple(int(v) for v in boxes[b]),
                      ema(track.probabilities, probabilities[b], smoothing))
        tracks.append(moved)
        assigned[b] = moved
    next_id = state.next_id
    for b, box in enumerate(boxes):
        if assigned[b] is None:
            born = Track(next_id, tuple(int(v) for v in box), probabilities[b].copy())
            next_id += 1
            tracks.append(born)
            assigned[b] = born
    return TrackerState(tuple(tracks), next_id), assigned
