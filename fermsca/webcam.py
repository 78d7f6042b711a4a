"""Live expression recognition: a camera shown in a window, each frame annotated as it comes.

    python -m fermsca.predict --webcam [N]      # camera N (default 0); q, Esc or closing quits

Each frame goes detect -> classify -> track -> draw (`live_frame`): the faces found by OpenCV's Haar
cascade, classified by the model, followed across frames with smoothed probabilities
(`fermsca.tracking`) and drawn with boxes, track ids, labels and probability bars
(`fermsca.drawing`). The window is Tk's (tkinter and Pillow's ImageTk: the OpenCV wheel is
headless, and Tk ships with Python). A missing display or camera is a DisplayError or CameraError
whose message is the one line the command prints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from fermsca import drawing, face_records, faces, inference, tracking

LIVE_BATCH = 8  # faces per model call: a frame holds few


class DisplayError(RuntimeError):
    """No window can be opened here."""


class CameraError(RuntimeError):
    """The camera cannot be opened or stopped delivering frames."""


def live_frame(rgb: np.ndarray, classify: Callable[[np.ndarray], np.ndarray],
               class_names: Sequence[str], state: tracking.TrackerState, *, detect: bool = True,
               margin: float = 0.0, smoothing: float = tracking.DEFAULT_SMOOTHING,
               source: dict | None = None
               ) -> tuple[np.ndarray, list[dict], tracking.TrackerState]:
    """The work of one live frame: detect -> classify -> track -> draw.

    Returns (the frame with boxes, track ids, labels and probability bars drawn, its records, the
    tracks after it). `classify` maps uint8 [N, 48, 48, 1] faces to [N, K] probabilities.
    """
    boxes, crops = inference.face_crops(rgb, detect=detect, margin=margin)
    probs = classify(np.stack(crops)[..., None]) if crops else np.zeros((0, len(class_names)))
    state, records = face_records.of_tracked_frame(state, source or {}, boxes, probs, class_names,
                                             smoothing=smoothing)
    return drawing.draw_annotations(rgb, records, bars=True), records, state


def live_loop(read: Callable[[], np.ndarray], step: Callable[[np.ndarray], np.ndarray],
              show: Callable[[np.ndarray], bool]) -> int:
    """Reads, processes and shows frames until `show` returns False (the window was closed);
    returns the number of frames processed. `read` raises CameraError when the camera fails."""
    shown = 0
    while True:
        shown += 1
        if not show(step(read())):
            return shown


def display_problem() -> str | None:
    """Why no window can open here, or None: on X11 systems, DISPLAY must be set."""
    if sys.platform in ("darwin", "win32", "cygwin"):
        return None
    if not os.environ.get("DISPLAY"):
        return "DISPLAY is not set"
    return None


def no_display_message(reason: str) -> str:
    return (f"--webcam needs a display for its window, and here {reason}; use --video FILE "
            "to classify a recorded video instead")


def no_camera_message(camera: int, reason: str = "cannot be opened (no such camera, or in use)"
                      ) -> str:
    return (f"--webcam: camera {camera} {reason}; use --video FILE to classify a recorded video "
            "instead")


def open_camera(index: int) -> cv2.VideoCapture:
    """cv2.VideoCapture of camera `index`; CameraError when it cannot be opened (OpenCV's own
    warnings about the attempt are silenced)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        capture = cv2.VideoCapture(index)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not capture.isOpened():
        capture.release()
        raise CameraError(no_camera_message(index))
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # show the newest frame, not a queue of old ones
    return capture


class Window:
    """A Tk window that shows RGB frames; q, Esc or the window's close button close it.

    Tk is Python's own GUI toolkit (the OpenCV wheel here is headless, without cv2.imshow); Pillow's
    ImageTk turns each frame into a Tk image. Raises DisplayError when Tk cannot open a window.
    """

    def __init__(self, title: str):
        try:
            import tkinter

            from PIL import ImageTk
        except ImportError as e:
            raise DisplayError(no_display_message(
                f"tkinter cannot be imported ({e}; on Debian: apt install python3-tk)")) from e
        try:
            self._root = tkinter.Tk()
        except tkinter.TclError as e:
            raise DisplayError(no_display_message(f"Tk cannot open a window ({e})")) from e
        self._image_tk = ImageTk
        self._root.title(title)
        self._label = tkinter.Label(self._root)
        self._label.pack()
        self._root.protocol("WM_DELETE_WINDOW", self.close)
        self._root.bind("<Key>", self._key)
        self.open = True

    def _key(self, event: Any) -> None:
        if event.keysym in ("q", "Q", "Escape"):
            self.close()

    def show(self, rgb: np.ndarray) -> bool:
        """Shows one frame and handles pending events; False once the window is closed."""
        if self.open:
            photo = self._image_tk.PhotoImage(Image.fromarray(rgb), master=self._root)
            self._label.configure(image=photo)
            self._label.image = photo  # Tk keeps no reference of its own
            self._root.update()
        return self.open

    def close(self) -> None:
        if self.open:
            self.open = False
            self._root.destroy()


def run_webcam(camera: int, load: Callable[[], Any], *, detect: bool = True, margin: float = 0.0,
               tta: bool = False, smoothing: float = tracking.DEFAULT_SMOOTHING) -> int:
    """`--webcam`: camera `camera` live in a window until it is closed; returns frames shown.

    Checks the display and opens the camera before `load` (the model) so that a missing one is
    reported at once. Raises DisplayError or CameraError, with the one-line message.
    """
    problem = display_problem()
    if problem:
        raise DisplayError(no_display_message(problem))
    capture = open_camera(camera)
    try:
        loaded = load()
        classify = loaded.classifier(tta=tta, batch_size=LIVE_BATCH)
        classify(np.zeros((1, faces.FACE_SIZE, faces.FACE_SIZE, 1), np.uint8))  # compile now
        window = Window(f"fermsca: camera {camera} (q or Esc to quit)")
        state = tracking.TrackerState()

        def read() -> np.ndarray:
            ok, frame = capture.read()
            if not ok:
                raise CameraError(no_camera_message(camera, "stopped delivering frames"))
            return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

        def step(rgb: np.ndarray) -> np.ndarray:
            nonlocal state
            drawn, _, state = live_frame(rgb, classify, loaded.class_names, state, detect=detect,
                                         margin=margin, smoothing=smoothing)
            return drawn

        try:
            return live_loop(read, step, window.show)
        finally:
            window.close()
    finally:
        capture.release()

