"""Drawing: boxes, labels and track ids on a copy of the image, probability panels beside the box
(the annotated files and videos are checked end to end in test_predict.py)."""

import numpy as np
import tiny_run

from fermsca import drawing

CLASS_NAMES = tiny_run.CLASS_NAMES


def test_bars_show_each_class_beside_the_box():
    image = np.full((200, 300, 3), 120, np.uint8)
    probs = dict.fromkeys(CLASS_NAMES, 0.0) | {"surprise": 1.0}
    record = {"box": [10, 20, 80, 80], "track": 2, "label": "surprise", "score": 1.0,
              "probabilities": probs}
    plain = drawing.draw_annotations(image, [record])
    drawn = drawing.draw_annotations(image, [record], bars=True)
    np.testing.assert_array_equal(drawn[:, :10], image[:, :10])  # left of the box: untouched
    assert (plain[25:, 95:] == 120).all()  # without bars, nothing beside the box (below the label)
    panel = drawn[20:, 94:]
    assert (panel == 40).any()  # the darkened panel (120 // 3)
    colour = np.array(drawing.PALETTE[1])  # track 2
    rows = np.where((panel == colour).all(axis=-1).any(axis=1))[0]
    assert len(rows) and rows.min() > 0  # one bar in the track's colour, below the first row
