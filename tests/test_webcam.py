"""The live path: one frame detected, classified, tracked and drawn; the loop; the one-line errors
without a display or a camera; the Tk window and --webcam end to end under Xvfb (where installed),
with a video file standing in for the camera."""

import cv2
import numpy as np
import pytest
import tiny_run
from fixtures import CLIP_FRAMES, left_right_tracks

from fermsca import inference, predict, webcam

CLASS_NAMES = tiny_run.CLASS_NAMES


def alternating_classifier(calls: list):
    """Stands in for a model: every face of the n-th call gets class n % 2, as one-hot."""

    def classify(crops: np.ndarray) -> np.ndarray:
        calls.append(len(crops))
        probs = np.zeros((len(crops), len(CLASS_NAMES)), np.float32)
        probs[:, (len(calls) - 1) % 2] = 1
        return probs

    return classify


def test_live_frame_detects_classifies_tracks_and_draws(face_clip):
    from fermsca import tracking

    _, decoded = face_clip
    calls, state, ids = [], tracking.TrackerState(), []
    for i, rgb in enumerate(decoded[:3]):
        drawn, records, state = webcam.live_frame(
            rgb, alternating_classifier(calls), CLASS_NAMES, state, smoothing=0.5,
            source={"frame": i})
        assert drawn.shape == rgb.shape and np.abs(drawn.astype(int) - rgb).mean() > 5
        ids.append(left_right_tracks(records)[i])
        assert all(r["faces"] == 2 and r["label"] == max(r["probabilities"],
                                                         key=r["probabilities"].get)
                   for r in records)
    assert calls == [2, 2, 2] and ids[0] == ids[1] == ids[2] and set(ids[0]) == {1, 2}
    # One-hot neutral, happiness, neutral, averaged with weight 0.5: (1, 0), (.5, .5), (.75, .25).
    for record in records:
        assert record["probabilities"]["neutral"] == 0.75
        assert record["probabilities"]["happiness"] == 0.25
    assert [(t.id, t.missed) for t in state.tracks] == [(1, 0), (2, 0)]


def test_live_loop_runs_until_the_window_closes_or_the_camera_fails(face_clip):
    _, decoded = face_clip
    frames = iter(decoded)
    shown = []

    def read():
        frame = next(frames, None)
        if frame is None:
            raise webcam.CameraError(webcam.no_camera_message(0, "stopped delivering frames"))
        return frame

    def show(rgb):  # the window is closed while the fourth frame is shown
        shown.append(rgb)
        return len(shown) < 4

    assert webcam.live_loop(read, lambda rgb: rgb[::2, ::2], show) == 4
    assert [s.shape for s in shown] == [(120, 160, 3)] * 4
    with pytest.raises(webcam.CameraError, match="camera 0 stopped delivering frames; use "
                                                 "--video FILE"):
        webcam.live_loop(read, lambda rgb: rgb, lambda rgb: True)
    assert len(shown) == 4


def test_webcam_without_a_display_or_a_camera_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    assert predict.main(["--webcam"]) == 2
    assert capsys.readouterr().err == (
        "error: --webcam needs a display for its window, and here DISPLAY is not set; use "
        "--video FILE to classify a recorded video instead\n")
    monkeypatch.setenv("DISPLAY", ":99")
    assert predict.main(["--webcam", "99"]) == 2
    assert capsys.readouterr().err == (
        "error: --webcam: camera 99 cannot be opened (no such camera, or in use); use --video "
        "FILE to classify a recorded video instead\n")


@pytest.fixture(scope="module")
def xvfb():
    """The display of an Xvfb server kept for this module's tests (skips where Xvfb is not
    installed). One server for all: Tk keeps its display connection after a window is destroyed,
    and Xlib ends the process when that connection's server goes away."""
    import shutil
    import subprocess

    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.skip("Xvfb is not installed (Debian: apt install xvfb)")
    server = subprocess.Popen([binary, "-displayfd", "1", "-screen", "0", "640x480x24",
                               "-nolisten", "tcp"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        number = server.stdout.readline().decode().strip()  # written once the server is ready
        assert number.isdigit(), "Xvfb did not start"
        yield f":{number}"
    finally:
        import gc

        gc.collect()  # Tk interpreters of the tests let go of the display while it is still up
        server.terminate()
        server.wait(10)


@pytest.fixture
def virtual_display(xvfb, monkeypatch):
    monkeypatch.setenv("DISPLAY", xvfb)
    return xvfb


def test_window_shows_frames_and_closes_on_q_escape_or_the_close_button(virtual_display):
    frame = np.full((240, 320, 3), 90, np.uint8)
    for close in ("q", "Escape", "x", "button"):
        window = webcam.Window("test")
        assert window.show(frame) and window.show(frame)
        root = window._root
        assert root.winfo_width() >= 320 and root.winfo_height() >= 240
        if close == "button":
            root.tk.call(root.protocol("WM_DELETE_WINDOW"))
        else:
            root.focus_force()
            root.update()
            root.event_generate("<Key>", keysym=close, when="now")
        assert window.open == (close == "x") and window.show(frame) == (close == "x")
        window.close()


def test_webcam_runs_the_live_path_in_a_window_until_the_camera_stops(virtual_display, workdir,
                                                                       face_clip, monkeypatch):
    clip, decoded = face_clip
    opened = []

    def open_clip(index):  # the clip stands in for camera `index`
        opened.append(index)
        return cv2.VideoCapture(clip)

    monkeypatch.setattr(webcam, "open_camera", open_clip)
    shown = []
    show = webcam.Window.show
    monkeypatch.setattr(webcam.Window, "show", lambda self, rgb: shown.append(rgb) or show(self, rgb))
    with pytest.raises(webcam.CameraError, match="camera 3 stopped delivering frames"):
        webcam.run_webcam(3, lambda: inference.load(workdir))
    assert opened == [3] and len(shown) == CLIP_FRAMES
    for drawn, plain in zip(shown, decoded, strict=True):  # boxes, labels and bars drawn
        assert drawn.shape == plain.shape and np.abs(drawn.astype(int) - plain).mean() > 5
