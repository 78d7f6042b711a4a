"""Speed of the in-browser webcam demo: frames/s and ms per frame by stage, in headless Chromium.

    python -m experiments.perf.browser_bench [--seconds=20] [--warmup=5]

Builds the page as `python -m fermsca.demo --no-serve` does (`demo.build_site`, the released FER+
weights), serves it on localhost and opens it in headless Chromium (`demo.Chromium`) whose fake
camera plays a 640x480 video at 30 frames/s: a face drawn by the synthetic dataset
(`synthetic_faces.draw_face`, upscaled to 192 px) drifting slowly over a colour gradient. After
--warmup seconds it reads the page's timing counters (`window.__fermsca.timing`, web/demo.js) over
--seconds: the frames the page processed per second, the camera's frames per second, and the ms
per frame of each stage (grab: frame to grey; detect: Haar cascade; crop; infer: ONNX model;
draw), mean and median. The page handles one frame at a time and then waits for the next camera
frame, so its rate is bounded either by the camera or by its own work; the record says which, with
the rate the work alone would allow (1000 / ms per frame). Writes JSON to --output and a
screenshot of the page mid-run to --screenshot.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags

from fermsca import bench, demo, faces

REPO = Path(__file__).resolve().parents[2]
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds over which the page's counters are read.")
_WARMUP = flags.DEFINE_float("warmup", 5.0, "Seconds the page runs before the counters are read.")
_OUTPUT = flags.DEFINE_string(
    "output", str(REPO / "experiments" / "results" / "bench" / "browser_bench.json"),
    "Where to write the result as JSON; empty to skip.")
_SCREENSHOT = flags.DEFINE_string("screenshot", str(REPO / "web" / "screenshot.png"),
                                  "Where to write the PNG of the page mid-run; empty to skip.")

WIDTH, HEIGHT, FPS = 640, 480, 30
FACE, PLACE = 192, (224, 120)  # the face's side and top-left corner at rest
LOOP_FRAMES = 90  # the video loops every 3 s; the drift below has that period
WINDOW = (1120, 720)  # the browser's window: the camera view and the bar chart side by side
STAGES = ("grab", "detect", "crop", "infer", "draw", "step")
PAGE_TIMEOUT_S = 120


def background() -> np.ndarray:
    """uint8 [H, W, 3] RGB: a smooth diagonal gradient from slate blue to warm grey."""
    t = (np.linspace(0, 1, WIDTH)[None, :] * 0.7 + np.linspace(0, 1, HEIGHT)[:, None] * 0.3)[..., None]
    top, bottom = np.array([70, 95, 140], np.float64), np.array([190, 175, 160], np.float64)
    return np.round(top + (bottom - top) * t).astype(np.uint8)


def place(index: int) -> tuple[int, int]:
    """Top-left corner of the face in frame `index`: a slow drift with period LOOP_FRAMES."""
    angle = 2 * np.pi * index / LOOP_FRAMES
    return PLACE[0] + round(24 * np.sin(angle)), PLACE[1] + round(10 * np.cos(angle))


def compose(face: np.ndarray, base: np.ndarray, index: int) -> np.ndarray:
    """uint8 [H, W, 3]: the grey 48x48 `face`, upscaled to FACE px, pasted on `base` at place(index)."""
    frame = base.copy()
    x, y = place(index)
    up = cv2.resize(face, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    frame[y:y + FACE, x:x + FACE] = up[..., None]
    return frame


def pick_face(base: np.ndarray, label: int = 1, tries: int = 50) -> tuple[np.ndarray, int]:
    """The first synthetic face of class `label` (seeds 0, 1, ...) that the cascade finds, alone and
    where it was pasted, at several points of the drift; (face, seed)."""
    from fermsca.datasets import synthetic_faces
    from fermsca.tracking import iou

    for seed in range(tries):
        face = synthetic_faces.draw_face(label, np.random.default_rng(seed))
        found = [faces.detect_faces(faces.to_gray(compose(face, base, i))) for i in (0, 22, 45, 67)]
        if all(len(boxes) == 1 and iou(boxes[0], (*place(i), FACE, FACE)) > 0.5
               for boxes, i in zip(found, (0, 22, 45, 67), strict=True)):
            return face, seed
    raise RuntimeError(f"none of {tries} synthetic faces of class {label} is found by the cascade")


def write_y4m(path: str, frames: Iterable[np.ndarray], fps: int = FPS) -> int:
    """Writes a YUV4MPEG2 video (4:2:0) of uint8 frames, [H, W] grey or [H, W, 3] RGB, all of one
    even size; returns the number of frames. Grey frames get neutral chroma; RGB frames are
    converted by OpenCV (BT.601, video range)."""
    count, size = 0, None
    with open(path, "wb") as f:
        for frame in frames:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3
                                                                      and frame.shape[2] != 3):
                raise ValueError(f"{path}: frame {count} is {frame.dtype} {frame.shape}; expected "
                                 "uint8 [H, W] or [H, W, 3]")
            height, width = frame.shape[:2]
            if size is None:
                if height % 2 or width % 2:
                    raise ValueError(f"{path}: frame size {width}x{height} is odd; 4:2:0 needs even")
                size = (height, width)
                f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
            elif (height, width) != size:
                raise ValueError(f"{path}: frame {count} is {width}x{height}, the first was "
                                 f"{size[1]}x{size[0]}")
            if frame.ndim == 2:
                chroma = np.full(height * width // 2, 128, np.uint8)
                planes = frame.tobytes() + chroma.tobytes()
            else:
                planes = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes()
            f.write(b"FRAME\n" + planes)
            count += 1
    if count == 0:
        raise ValueError(f"{path}: no frames to write")
    return count


def summarize(before: dict, after: dict, samples: Sequence[dict]) -> dict:
    """What the page did between two reads of its counters (`timing` plus `now`, ms): steps and
    camera frames per second, faces per step, and per stage the mean ms (from the running sums)
    and the median ms (from the per-step `samples` that started in between)."""
    seconds = (after["now"] - before["now"]) / 1e3
    steps = after["steps"] - before["steps"]
    if seconds <= 0 or steps <= 0:
        raise ValueError(f"no step of the page in {seconds:.1f} s")
    window = [s for s in samples if before["now"] <= s["at"] < after["now"]]
    stages = {}
    for k in STAGES:
        stages[k] = {"mean": round((after["sum"][k] - before["sum"][k]) / steps, 3),
                     "median": round(float(np.median([s[k] for s in window])), 3) if window else None}
    camera = None
    if before.get("cameraFrames") is not None and after.get("cameraFrames") is not None:
        camera = round((after["cameraFrames"] - before["cameraFrames"]) / seconds, 2)
    return {"seconds": round(seconds, 2), "frames_processed": steps,
            "frames_per_second": round(steps / seconds, 2), "camera_frames_per_second": camera,
            "faces_per_frame": round((after["faces"] - before["faces"]) / steps, 3),
            "samples_in_window": len(window), "ms_per_frame": stages}


def loop_bound(frames_per_second: float, camera_fps: float, step_ms: float) -> dict:
    """Whether the page's loop was held back by the camera (it handled nearly every frame, 90% or
    more, and its work per frame fits in the frame interval) or by its own work; the frames/s the
    work alone would allow (1000 / ms per frame) and the share of wall time spent working."""
    work_fps = 1e3 / step_ms
    by_camera = frames_per_second >= 0.9 * camera_fps and work_fps > camera_fps
    return {"bounded_by": "camera" if by_camera else "work",
            "work_ms_per_frame": round(step_ms, 2),
            "max_frames_per_second_of_the_work": round(work_fps, 1),
            "busy_fraction": round(frames_per_second * step_ms / 1e3, 3)}


def package_version(name: str) -> str:
    with open(os.path.join(demo.WEB_DIR, "node_modules", name, "package.json")) as f:
        return json.load(f)["version"]


READ_COUNTERS = ("(t => ({now: performance.now(), steps: t.steps, faces: t.faces, "
                 "cameraFrames: t.cameraFrames, sum: {...t.sum}}))(__fermsca.timing)")


def wait_until_running(browser: demo.Chromium) -> dict:
    """The page's camera settings once it has handled its first frame; raises on a page error."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        state = browser.evaluate(
            "window.__fermsca && {error: __fermsca.error, steps: __fermsca.timing.steps, "
            "camera: __fermsca.ready ? document.getElementById('video').srcObject"
            ".getVideoTracks()[0].getSettings() : null}") or {}
        if state.get("error"):
            raise RuntimeError(f"the page failed: {state['error']}")
        if state.get("steps"):
            return state["camera"]
        time.sleep(0.5)
    raise TimeoutError(f"the page handled no camera frame in {PAGE_TIMEOUT_S} s")


def run_page(site: str, video: str, tmp: str, warmup: float, seconds: float,
             screenshot: str | None) -> dict:
    server = demo.make_server(site, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = demo.Chromium([*demo.CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={video}",
                             f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
                             f"--user-data-dir={os.path.join(tmp, 'profile')}", "about:blank"],
                            os.path.join(tmp, "chromium.log"))
    try:
        version = browser.send("Browser.getVersion")
        browser.open(demo.page_url(server))
        camera = wait_until_running(browser)
        time.sleep(warmup)
        before = browser.evaluate(READ_COUNTERS)
        time.sleep(seconds)
        after = browser.evaluate(READ_COUNTERS)
        samples = browser.evaluate("__fermsca.timing.samples")
        error = browser.evaluate("__fermsca.error")
        if error:
            raise RuntimeError(f"the page failed: {error}")
        last = browser.evaluate("(s => s && s.faces.map(f => ({box: f.box, label: f.label, "
                                "score: f.score})))(__fermsca.snapshot())")
        if screenshot:
            browser.screenshot(screenshot)
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    camera = {k: camera[k] for k in ("width", "height", "frameRate", "resizeMode") if k in camera}
    return {"chromium": version["product"], "user_agent": version["userAgent"], "camera": camera,
            "last_faces": last, **summarize(before, after, samples)}


def main(argv):
    del argv
    if not os.access(demo.CHROMIUM, os.X_OK):
        raise SystemExit(f"error: {demo.CHROMIUM} not found: apt-get install chromium")
    load_begin = os.getloadavg()
    site = demo.build_site()
    base = background()
    face, seed = pick_face(base)
    with tempfile.TemporaryDirectory(prefix="browser_bench.") as tmp:
        video = os.path.join(tmp, "camera.y4m")
        write_y4m(video, (compose(face, base, i) for i in range(LOOP_FRAMES)))
        shot = os.path.join(tmp, "screenshot.png") if _SCREENSHOT.value else None
        result = run_page(site, video, tmp, _WARMUP.value, _SECONDS.value, shot)
        if shot:
            shutil.copyfile(shot, _SCREENSHOT.value)
    step = result["ms_per_frame"]["step"]["mean"]
    camera_fps = result["camera_frames_per_second"] or FPS
    result["loop"] = loop_bound(result["frames_per_second"], camera_fps, step)
    split = ", ".join(f"{k} {v['mean']:.2f}" for k, v in result["ms_per_frame"].items())
    print(f"{result['frames_per_second']} frames/s processed (camera {camera_fps} frames/s), "
          f"bounded by the {result['loop']['bounded_by']}; ms per frame (mean): {split}; "
          f"the work alone allows {result['loop']['max_frames_per_second_of_the_work']} frames/s")
    record = {
        "command": shlex.join(["python", "-m", "experiments.perf.browser_bench", *sys.argv[1:]]),
        "warmup_seconds": _WARMUP.value,
        "video": {"size": [WIDTH, HEIGHT], "fps": FPS, "format": "y4m, 4:2:0", "loop_frames": LOOP_FRAMES,
                  "face_px": FACE, "faces_per_frame": 1,
                  "face": f"synthetic_faces.draw_face(1, default_rng({seed})), upscaled 4x (cubic), "
                          "drifting +-24 px / +-10 px over 3 s",
                  "background": "smooth RGB gradient"},
        "page": "web/demo.js as built by `python -m fermsca.demo --no-serve` (released FER+ weights): "
                "one step per new camera frame (requestVideoFrameCallback); grab = canvas drawImage + "
                "getImageData + cvtColor to grey, detect = OpenCV.js Haar cascade (detect_faces "
                "settings), crop = 48x48 crops, infer = onnxruntime-web wasm, 1 thread, draw = boxes, "
                "labels and bars; step = all of them",
        **result,
        "screenshot": os.path.relpath(_SCREENSHOT.value, REPO) if _SCREENSHOT.value else None,
        "onnxruntime_web": package_version("onnxruntime-web"),
        "opencv_js": package_version("@techstark/opencv-js"),
        "chromium_flags": list(demo.CHROMIUM_FLAGS),
        "cpu": bench.cpu_model(), "cpu_count": os.cpu_count(), "avx512": bench.avx512(),
        "load_average_start_end": [round(load_begin[0], 2), round(os.getloadavg()[0], 2)],
        "notes": "Headless Chromium, software rendering (--disable-gpu). The 2 CPU cores were shared "
                 "during the run with a niced (low-priority) background training job and with other "
                 "processes (test runs); the load average above shows how busy the machine was. "
                 "performance.now() has 0.1 ms resolution in a page that is not cross-origin "
                 "isolated, so the medians are multiples of 0.1 ms; the means are exact sums.",
    }
    if _OUTPUT.value:
        bench.write_json(_OUTPUT.value, record)


if __name__ == "__main__":
    app.run(main)
