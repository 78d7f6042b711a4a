import numpy as np

from fermsca import face_records, tracking

NAMES = ("neutral", "happiness", "surprise")


def test_one_record_per_face_or_one_saying_none():
    source = {"file": "a.jpg"}
    assert face_records.of_frame(source, [], np.zeros((0, 3)), NAMES) == [{"file": "a.jpg", "faces": 0}]
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    first, second = face_records.of_frame(source, [(1, 2, 30, 30), (50, 2, 20, 20)], probs, NAMES)
    assert first == {"file": "a.jpg", "faces": 2, "face": 0, "box": [1, 2, 30, 30], "label": "happiness",
                     "score": 0.7, "probabilities": {"neutral": 0.1, "happiness": 0.7, "surprise": 0.2}}
    assert second["face"] == 1 and second["label"] == "neutral" and "track" not in second


def test_tracked_frames_carry_track_ids_and_smoothed_probabilities():
    box = (10, 10, 40, 40)
    state = tracking.TrackerState()
    state, (a,) = face_records.of_tracked_frame(state, {"frame": 0}, [box], np.array([[1.0, 0.0, 0.0]]),
                                                NAMES, smoothing=0.25)
    state, (b,) = face_records.of_tracked_frame(state, {"frame": 1}, [(12, 10, 40, 40)],
                                                np.array([[0.0, 1.0, 0.0]]), NAMES, smoothing=0.25)
    assert a["track"] == b["track"] == 1 and a["label"] == "neutral"
    # 0.75 * (1, 0, 0) + 0.25 * (0, 1, 0): the first frame still dominates
    assert b["probabilities"] == {"neutral": 0.75, "happiness": 0.25, "surprise": 0.0}
    assert b["label"] == "neutral" and b["frame"] == 1
