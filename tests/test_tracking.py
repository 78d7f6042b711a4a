"""Tracking: IoU, matching, track birth and death, and the moving average, against hand-computed
values."""

import numpy as np
import pytest

from fermsca import tracking


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 0, 10, 10), 50 / 150),  # half overlap: 50 of 100 + 100 - 50
    ((0, 0, 10, 10), (5, 5, 10, 10), 25 / 175),  # a quarter: 25 of 100 + 100 - 25
    ((0, 0, 10, 10), (0, 0, 5, 5), 25 / 100),  # one inside the other
    ((0, 0, 10, 10), (10, 0, 10, 10), 0.0),  # touching edges
    ((0, 0, 10, 10), (20, 20, 5, 5), 0.0),
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # no area
])
def test_iou(a, b, expected):
    assert tracking.iou(a, b) == pytest.approx(expected)
    assert tracking.iou(b, a) == pytest.approx(expected)


def test_iou_matrix():
    boxes = [(0, 0, 10, 10), (5, 0, 10, 10)]
    np.testing.assert_allclose(tracking.iou_matrix(boxes, boxes + [(0, 0, 5, 5)]),
                               [[1, 1 / 3, 0.25], [1 / 3, 1, 0]])
    assert tracking.iou_matrix([], boxes).shape == (0, 2)


def test_match_maximises_the_total_and_drops_weak_pairs():
    overlaps = np.array([[0.9, 0.5],
                         [0.8, 0.1]])
    # Greedy would take 0.9 then 0.1 (total 1.0); the best assignment is 0.5 + 0.8 = 1.3.
    assert tracking.match(overlaps, min_iou=0.3) == [(0, 1), (1, 0)]
    assert tracking.match(overlaps, min_iou=0.6) == [(1, 0)]
    assert tracking.match(np.array([[0.2, 0.7, 0.4]]), min_iou=0.3) == [(0, 1)]
    assert tracking.match(np.zeros((0, 3))) == []
    assert tracking.match(np.zeros((2, 0))) == []


def test_ema():
    np.testing.assert_allclose(tracking.ema([1, 0], [0, 1], 0.3), [0.7, 0.3])
    np.testing.assert_allclose(tracking.ema([0.7, 0.3], [0, 1], 0.3), [0.49, 0.51])
    np.testing.assert_allclose(tracking.ema([0.2, 0.8], [0.6, 0.4], 1.0), [0.6, 0.4])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="smoothing must be in"):
            tracking.ema([1, 0], [0, 1], bad)


def step(state, boxes, probs, **kwargs):
    state, tracks = tracking.update(state, boxes, np.array(probs, np.float64).reshape(len(boxes), 2),
                                    max_missed=2, **kwargs)
    return state, [t.id for t in tracks], tracks


def test_tracks_are_born_matched_smoothed_and_dropped():
    a, b = (0, 0, 10, 10), (50, 50, 10, 10)
    state, ids, tracks = step(tracking.TrackerState(), [a, b], [[1, 0], [0, 1]])
    assert ids == [1, 2] and state.next_id == 3
    np.testing.assert_allclose(tracks[0].probabilities, [1, 0])  # a new track starts at its face

    # Both faces move a little and come in the other order: IoU 8*10 / 120 = 2/3 and 90 / 110.
    b2, a2 = (52, 50, 10, 10), (1, 0, 10, 10)
    state, ids, tracks = step(state, [b2, a2], [[0.5, 0.5], [0, 1]])
    assert ids == [2, 1] and state.next_id == 3
    np.testing.assert_allclose(tracks[0].probabilities, [0.15, 0.85])  # 0.3 [.5 .5] + 0.7 [0 1]
    np.testing.assert_allclose(tracks[1].probabilities, [0.7, 0.3])  # 0.3 [0 1] + 0.7 [1 0]
    assert tracks[0].box == b2 and tracks[1].box == a2

    # Face 1 is not seen for two frames: its track waits at its last box, then takes it again.
    state, ids, _ = step(state, [b2], [[0, 1]])
    assert ids == [2] and [(t.id, t.missed) for t in state.tracks] == [(1, 1), (2, 0)]
    state, ids, _ = step(state, [], [])
    assert ids == [] and [(t.id, t.missed) for t in state.tracks] == [(1, 2), (2, 1)]
    state, ids, tracks = step(state, [(2, 1, 10, 10)], [[1, 0]])
    assert ids == [1] and [(t.id, t.missed) for t in state.tracks] == [(1, 0), (2, 2)]
    np.testing.assert_allclose(tracks[0].probabilities, [0.79, 0.21])  # 0.3 [1 0] + 0.7 [.7 .3]

    # Track 2 misses a third frame (more than max_missed=2): dropped. Its place then starts track 3.
    state, ids, _ = step(state, [(2, 1, 10, 10)], [[1, 0]])
    assert [t.id for t in state.tracks] == [1]
    state, ids, _ = step(state, [(2, 1, 10, 10), b2], [[1, 0], [0, 1]])
    assert ids == [1, 3] and state.next_id == 4


def test_a_box_far_from_every_track_starts_a_new_one():
    state, ids, _ = step(tracking.TrackerState(), [(0, 0, 10, 10)], [[1, 0]])
    # IoU with track 1 is 25 / 175 = 0.14, below min_iou 0.3.
    state, ids, _ = step(state, [(5, 5, 10, 10)], [[1, 0]])
    assert ids == [2] and [(t.id, t.missed) for t in state.tracks] == [(1, 1), (2, 0)]
    # The same boxes with min_iou 0.1 match.
    state, ids, _ = step(tracking.TrackerState(), [(0, 0, 10, 10)], [[1, 0]])
    state, ids, _ = step(state, [(5, 5, 10, 10)], [[1, 0]], min_iou=0.1)
    assert ids == [1]


def test_smoothing_one_keeps_each_frames_probabilities():
    state, _, _ = step(tracking.TrackerState(), [(0, 0, 10, 10)], [[1, 0]], smoothing=1.0)
    _, _, tracks = step(state, [(0, 0, 10, 10)], [[0.25, 0.75]], smoothing=1.0)
    np.testing.assert_allclose(tracks[0].probabilities, [0.25, 0.75])


def test_update_does_not_change_its_input_state():
    state, _, _ = step(tracking.TrackerState(), [(0, 0, 10, 10)], [[1, 0]])
    before = state.tracks[0]
    step(state, [(1, 0, 10, 10)], [[0, 1]])
    assert state.tracks[0] is before and before.box == (0, 0, 10, 10)
    np.testing.assert_array_equal(before.probabilities, [1, 0])
