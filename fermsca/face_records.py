"""The JSON records `fermsca.predict` prints for each image or video frame, one per face.

    {"file": "a.jpg", "faces": 2, "face": 0, "box": [x, y, w, h], "label": "happiness",
     "score": 0.93, "probabilities": {"neutral": 0.01, ...}}      one per face
    {"file": "b.jpg", "faces": 0}                                    no face found

Video and webcam frames add "track" (`fermsca.tracking`) and carry the track's smoothed
probabilities instead of the frame's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fermsca import tracking


def of_frame(source: dict, boxes: Sequence, probabilities: Any, class_names: Sequence[str],
             track_ids: Sequence[int] | None = None) -> list[dict]:
    """The records of one image or frame: one per face (in `boxes` order), or one saying none."""
    if not len(boxes):
        return [{**source, "faces": 0}]
    records = []
    for i, (box, p) in enumerate(zip(boxes, probabilities, strict=True)):
        k = int(np.argmax(p))
        record = {**source, "faces": len(boxes), "face": i}
        if track_ids is not None:
            record["track"] = int(track_ids[i])
        record.update({
            "box": [int(v) for v in box], "label": class_names[k], "score": round(float(p[k]), 6),
            "probabilities": {n: round(float(v), 6) for n, v in zip(class_names, p, strict=True)},
        })
        records.append(record)
    return records


def of_tracked_frame(state: tracking.TrackerState, source: dict, boxes: Sequence, probabilities: Any,
                     class_names: Sequence[str], *, smoothing: float = tracking.DEFAULT_SMOOTHING
                     ) -> tuple[tracking.TrackerState, list[dict]]:
    """`of_frame` after `tracking.update`: each face with its track id and its track's smoothed
    probabilities. Returns (the tracks after this frame, the records)."""
    state, tracks = tracking.update(state, [tuple(b) for b in boxes], probabilities,
                                    smoothing=smoothing)
    smoothed = [t.probabilities for t in tracks]
    return state, of_frame(source, boxes, smoothed, class_names, [t.id for t in tracks])
