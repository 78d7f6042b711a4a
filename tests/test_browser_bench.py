"""The browser benchmark's pure parts: the camera video (y4m writer, frames, face) and the summary of
the page's counters. The benchmark itself (minutes, Chromium) is not run here."""

import cv2
import numpy as np
import pytest

from experiments.perf import browser_bench as bb
from fermsca import faces


def read_y4m(path: str) -> tuple[bytes, list[bytes]]:
    """Header line and raw frames of a 4:2:0 y4m file, parsed by hand."""
    data = open(path, "rb").read()
    header, body = data.split(b"\n", 1)
    fields = dict((f[:1], f[1:]) for f in header.split()[1:])
    size = int(fields[b"W"]) * int(fields[b"H"]) * 3 // 2
    frames = []
    while body:
        assert body.startswith(b"FRAME\n")
        frames.append(body[6:6 + size])
        body = body[6 + size:]
    return header, frames


def test_y4m_of_grey_frames_has_their_luma_and_neutral_chroma(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (6, 8), dtype=np.uint8)
    path = str(tmp_path / "grey.y4m")
    assert bb.write_y4m(path, [grey, 255 - grey, grey], fps=30) == 3
    header, frames = read_y4m(path)
    assert header == b"YUV4MPEG2 W8 H6 F30:1 Ip A1:1 C420jpeg"
    assert len(frames) == 3 and all(len(f) == 6 * 8 * 3 // 2 for f in frames)
    np.testing.assert_array_equal(np.frombuffer(frames[1][:48], np.uint8).reshape(6, 8), 255 - grey)
    assert set(frames[1][48:]) == {128}


def test_y4m_of_rgb_frames_reads_back_with_ffmpeg(tmp_path):
    rgb = bb.background()[:64, :96].copy()
    rgb[10:30, 20:50] = [200, 30, 40]  # a block of saturated colour on the gradient
    path = str(tmp_path / "rgb.y4m")
    bb.write_y4m(path, [rgb, rgb[::-1].copy()], fps=30)
    capture = cv2.VideoCapture(path)
    assert capture.isOpened() and capture.get(cv2.CAP_PROP_FPS) == 30
    read = []
    while (got := capture.read())[0]:
        read.append(got[1][..., ::-1].astype(int))  # BGR -> RGB
    capture.release()
    assert len(read) == 2
    assert np.abs(read[0] - rgb).max() <= 4 and np.abs(read[1] - rgb[::-1]).max() <= 4


def test_y4m_rejects_bad_frames_by_name(tmp_path):
    path = str(tmp_path / "bad.y4m")
    with pytest.raises(ValueError, match="bad.y4m: frame size 7x6 is odd"):
        bb.write_y4m(path, [np.zeros((6, 7), np.uint8)])
    with pytest.raises(ValueError, match="bad.y4m: frame 1 is 8x4, the first was 8x6"):
        bb.write_y4m(path, [np.zeros((6, 8), np.uint8), np.zeros((4, 8), np.uint8)])
    with pytest.raises(ValueError, match=r"bad.y4m: frame 0 is float32 \(6, 8\)"):
        bb.write_y4m(path, [np.zeros((6, 8), np.float32)])
    with pytest.raises(ValueError, match="bad.y4m: no frames"):
        bb.write_y4m(path, [])


def test_camera_frames_loop_and_the_cascade_finds_the_face():
    base = bb.background()
    assert base.shape == (bb.HEIGHT, bb.WIDTH, 3) and base.dtype == np.uint8
    assert bb.place(0) == bb.place(bb.LOOP_FRAMES)  # a seamless loop
    for i in range(bb.LOOP_FRAMES):
        x, y = bb.place(i)
        assert 0 <= x and x + bb.FACE <= bb.WIDTH and 0 <= y and y + bb.FACE <= bb.HEIGHT
    face, seed = bb.pick_face(base)
    frame = bb.compose(face, base, 30)
    x, y = bb.place(30)
    np.testing.assert_array_equal(frame[y - 1, x - 1], base[y - 1, x - 1])
    np.testing.assert_array_equal(frame[y:y + bb.FACE, x:x + bb.FACE, 0],
                                  cv2.resize(face, (bb.FACE, bb.FACE), interpolation=cv2.INTER_CUBIC))
    assert len(faces.detect_faces(faces.to_gray(frame))) == 1


def counters(now, steps, faces_seen, camera, per_stage):
    return {"now": now, "steps": steps, "faces": faces_seen, "cameraFrames": camera,
            "sum": {k: per_stage for k in bb.STAGES}}


def test_summary_of_the_counters_between_two_reads():
    before = counters(1000.0, 10, 10, 30, 100.0)
    after = counters(3000.0, 30, 50, 90, 500.0)
    samples = [{"at": at, **{k: v for k in bb.STAGES}}
               for at, v in ((900.0, 99.0), (1000.0, 1.0), (1500.0, 2.0), (2000.0, 10.0), (3000.0, 99.0))]
    s = bb.summarize(before, after, samples)
    assert s["seconds"] == 2.0 and s["frames_processed"] == 20
    assert s["frames_per_second"] == 10.0 and s["camera_frames_per_second"] == 30.0
    assert s["faces_per_frame"] == 2.0 and s["samples_in_window"] == 3
    assert s["ms_per_frame"]["detect"] == {"mean": 20.0, "median": 2.0}
    assert bb.summarize({**before, "cameraFrames": None}, after, [])["camera_frames_per_second"] is None
    with pytest.raises(ValueError, match="no step of the page"):
        bb.summarize(before, before, samples)


def test_loop_bound_says_camera_or_work():
    camera = bb.loop_bound(29.7, 30.0, 12.5)
    assert camera == {"bounded_by": "camera", "work_ms_per_frame": 12.5,
                      "max_frames_per_second_of_the_work": 80.0, "busy_fraction": 0.371}
    work = bb.loop_bound(12.0, 30.0, 80.0)
    assert work["bounded_by"] == "work" and work["max_frames_per_second_of_the_work"] == 12.5
    assert work["busy_fraction"] == 0.96
