"""The webcam demo end to end: a face (a real FER+ one where the shared data is present, else one drawn
by the synthetic set) as a fake camera in headless Chromium, the page's box, crop and probabilities
against `fermsca.faces` and the JAX model on the very frame the page saw.

Chromium is driven over the DevTools protocol on a pipe (`demo.Chromium`), so the test needs no driver
package. A screenshot of the page (PNG in the test's tmp_path) is kept once the box and label are checked.
"""

import base64
import os
import shutil
import threading
import time

import cv2
import haar_margin
import numpy as np
import pytest
from test_faces import FERPLUS_TARBALL, iou, read_ferplus_faces

from fermsca import demo, export, faces, inference

WIDTH, HEIGHT = 640, 480
PASTE_X, PASTE_Y, PASTE_SIDE = 224, 120, 192  # the face, upscaled 4x, in the 640x480 frame
PAGE_TIMEOUT_S = 90
LARGE = (1700, 1275)  # width, height: over faces.detect_faces' max_side of 1280


def render(face: np.ndarray, _: int = 0) -> np.ndarray:
    frame = np.full((HEIGHT, WIDTH), 128, np.uint8)
    up = cv2.resize(face, (PASTE_SIDE, PASTE_SIDE), interpolation=cv2.INTER_CUBIC)
    frame[PASTE_Y:PASTE_Y + PASTE_SIDE, PASTE_X:PASTE_X + PASTE_SIDE] = up
    return frame


def write_y4m(path: str, gray: np.ndarray, frames: int = 5) -> None:
    """A grey video of `frames` copies of `gray`: YUV 4:2:0 with neutral chroma."""
    height, width = gray.shape
    chroma = np.full((height // 2) * (width // 2), 128, np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n" + gray.tobytes() + chroma + chroma)


def decode(text: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.uint8).reshape(shape)


def candidate_faces(count: int = 24) -> list[np.ndarray]:
    """Real FER+ faces from the shared data, or where it is absent (a fresh clone, CI) faces drawn
    by the synthetic set, so that the browser test runs wherever Chromium does."""
    if os.path.isfile(FERPLUS_TARBALL):
        return read_ferplus_faces(count)
    from fermsca.datasets import synthetic_faces

    return [synthetic_faces.draw_face(i % 8, np.random.default_rng(i)) for i in range(count)]


@pytest.fixture(scope="module")
def face_frame():
    clear = haar_margin.clear_faces(candidate_faces(), render, count=1, draws=1,
                                    where=(PASTE_X, PASTE_Y, PASTE_SIDE, PASTE_SIDE), min_iou=0.7)
    assert clear, "no face of the sample is found with a clear margin"
    return render(clear[0])


@pytest.mark.slow  # Chromium end to end (about 25-30 s of two cores); CI runs it after the suite
def test_page_finds_and_classifies_the_face_like_python(face_frame, tmp_path, record_property):
    if not os.access(demo.CHROMIUM, os.X_OK):
        pytest.skip(f"{demo.CHROMIUM} not found: apt-get install chromium")
    if shutil.which("npm") is None and not os.path.isdir(os.path.join(demo.WEB_DIR, "node_modules")):
        pytest.skip("npm not found (needed once for `npm ci` in web/): apt-get install nodejs npm")
    site = demo.build_site(workdir=str(tmp_path / "work"))
    model = os.path.realpath(demo.export_model(None, str(tmp_path / "work")))  # cached: no new export
    assert open(model, "rb").read() == open(os.path.join(site, demo.MODEL_FILE), "rb").read()
    exported_at = os.stat(model).st_mtime_ns
    video = str(tmp_path / "face.y4m")
    write_y4m(video, face_frame)
    server = demo.make_server(site, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = demo.Chromium([*demo.CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={video}",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            str(tmp_path / "chromium.log"))
    try:
        browser.open(demo.page_url(server))
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        shot = None
        while time.monotonic() < deadline:
            state = browser.evaluate("window.__fermsca && {error: __fermsca.error, "
                                     "shot: __fermsca.snapshot()}") or {}
            assert not state.get("error"), f"the page failed: {state['error']}"
            shot = state.get("shot")
            if shot and shot["faces"] and shot["frames"] >= 2:
                break
            time.sleep(0.5)
        assert shot and shot["faces"], f"no face found by the page in {PAGE_TIMEOUT_S} s: {shot}"
        x, y, w, h = shot["faces"][0]["box"]
        # What a person sees: the box drawn in green around the face, the bars of its probabilities.
        pixel = browser.evaluate("Array.from(document.getElementById('view').getContext('2d')"
                                 f".getImageData({x}, {y + h // 2}, 1, 1).data)")
        bars = browser.evaluate("Array.from(document.querySelectorAll('#bars .value'), e => e.textContent)")
        # The page as a person sees it then (the still video gives the same box and label).
        screenshot = browser.screenshot(str(tmp_path / "page.png"))
        print(f"screenshot of the page: {screenshot}")
        record_property("screenshot", screenshot)
        view = browser.evaluate("(r => [r.left, r.top])"
                                "(document.getElementById('view').getBoundingClientRect())")
        # A frame larger than detect_faces' max_side is searched shrunk, its boxes mapped back.
        large = cv2.resize(decode(shot["frame"], (HEIGHT, WIDTH)), LARGE, interpolation=cv2.INTER_LINEAR)
        found = browser.evaluate(f"__fermsca.findFaces('{base64.b64encode(large.tobytes()).decode()}', "
                                 f"{LARGE[0]}, {LARGE[1]})")
    finally:
        browser.close()
        server.shutdown()
        server.server_close()

    assert (shot["width"], shot["height"]) == (WIDTH, HEIGHT)
    frame = decode(shot["frame"], (HEIGHT, WIDTH))
    # The frame is the video's (Chromium converts YUV to RGB and the page back to grey).
    assert np.corrcoef(frame.ravel(), face_frame.ravel())[0, 1] > 0.99

    face = shot["faces"][0]
    box = tuple(face["box"])
    python_boxes = faces.detect_faces(frame)
    assert python_boxes, "Python finds no face on the page's frame"
    assert iou(box, python_boxes[0]) > 0.9, (box, python_boxes)
    assert iou(box, (PASTE_X, PASTE_Y, PASTE_SIDE, PASTE_SIDE)) > 0.6, box

    crop = decode(face["crop"], (faces.FACE_SIZE, faces.FACE_SIZE))
    np.testing.assert_array_equal(crop, faces.crop_face(frame, box))

    model = inference.load()
    expected = model.classify(crop[None, :, :, None])[0]
    browser_probs = np.asarray(face["probabilities"], np.float32)
    np.testing.assert_allclose(browser_probs, expected, atol=export.TOLERANCE)
    assert os.stat(demo.export_model(None, str(tmp_path / "work"))).st_mtime_ns == exported_at
    assert face["label"] == model.class_names[int(np.argmax(expected))]
    assert face["score"] == pytest.approx(float(np.max(expected)), abs=1e-4)

    assert found["boxes"], "the page finds no face in the large frame"
    large_box = tuple(found["boxes"][0])
    assert iou(large_box, faces.detect_faces(large)[0]) > 0.9, (large_box, faces.detect_faces(large))
    np.testing.assert_array_equal(decode(found["crops"][0], (faces.FACE_SIZE, faces.FACE_SIZE)),
                                  faces.crop_face(large, large_box))

    assert pixel[:3] == [0x2E, 0xCC, 0x40], f"no green box edge at ({x}, {y + h // 2}): {pixel}"
    assert bars == [f"{p:.2f}" for p in browser_probs]
    # The screenshot shows that box edge too (BGR), where the canvas lies on the page.
    image = cv2.imread(screenshot)
    assert image is not None, f"{screenshot}: not a readable PNG"
    edge = image[round(view[1]) + y + h // 2, round(view[0]) + x].astype(int)
    assert np.abs(edge - [0x40, 0xCC, 0x2E]).max() <= 2, f"{screenshot}: no green box edge there: {edge}"


# ----------------------------------------------------------------------------------------------
# The command line and the server, without a browser.


def run_main(capsys, argv):
    status = demo.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    status, _, err = run_main(capsys, ["--checkpoint", missing, "--no-serve", "--workdir",
                                       str(tmp_path / "work")])
    assert status == 2
    assert err.startswith("error: ") and missing in err and err.count("\n") == 1


def test_bad_port_is_one_line(capsys):
    status, _, err = run_main(capsys, ["--port", "70000", "--no-serve"])
    assert status == 2 and err == "error: --port 70000: expected 0-65535\n"


def test_missing_npm_names_the_fix(tmp_path, monkeypatch):
    web = tmp_path / "web"
    web.mkdir()
    shutil.copy(os.path.join(demo.WEB_DIR, "package-lock.json"), web)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(demo.DemoError, match="npm not found: install Node.js and npm"):
        demo.install_packages(str(web))


def test_busy_port_is_a_clear_error(tmp_path):
    server = demo.make_server(str(tmp_path), "127.0.0.1", 0)
    try:
        with pytest.raises(demo.DemoError, match="cannot serve on 127.0.0.1:.*--port"):
            demo.make_server(str(tmp_path), "127.0.0.1", server.server_address[1])
    finally:
        server.server_close()


def test_server_gives_modules_and_wasm_their_types(tmp_path):
    import urllib.request

    for name in ("demo.js", "ort.mjs", "ort.wasm", "settings.json"):
        (tmp_path / name).write_bytes(b"x")
    server = demo.make_server(str(tmp_path), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = demo.page_url(server)
        assert url.startswith("http://localhost:")
        types = {}
        for name in ("demo.js", "ort.mjs", "ort.wasm", "settings.json"):
            with urllib.request.urlopen(url + name) as response:
                types[name] = response.headers["Content-Type"]
    finally:
        server.shutdown()
        server.server_close()
    assert types == {"demo.js": "text/javascript", "ort.mjs": "text/javascript",
                     "ort.wasm": "application/wasm", "settings.json": "application/json"}


def test_page_settings_are_detect_faces_defaults():
    settings = demo.page_settings(["a", "b"])
    assert settings["detect"] == {"scale_factor": 1.1, "min_neighbors": 5, "min_size": 30, "max_side": 1280}
    assert settings["face_size"] == faces.FACE_SIZE == 48 and settings["margin"] == 0.0
    assert settings["class_names"] == ["a", "b"] and settings["cascade"] == faces.CASCADE_FILE
