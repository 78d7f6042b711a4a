"""The webcam demo: the FER+ model in the browser, entirely client-side.

    python -m fermsca.demo [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--workdir DIR] [--no-serve]

Exports the checkpoint (default: the released FER+ weights) to ONNX with `fermsca.export`, once per
checkpoint (cached under WORKDIR/models/), installs the page's npm packages (`npm ci` in web/) when
they are missing, assembles the page in WORKDIR/site/ and serves it with `http.server`. In the page,
OpenCV.js finds faces with the Haar cascade of `fermsca.faces` (the same file, same settings), crops
them as `faces.crop_face` does and onnxruntime-web (wasm) runs model.onnx; no file comes from
anywhere but this server. web/README.md describes the page.

`Chromium` drives headless Chromium over the DevTools protocol, for the page's end-to-end test
(tests/test_demo.py) and its benchmark (experiments/perf/browser_bench.py).
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import http.server
import inspect
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence

from fermsca import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB_DIR = os.path.join(REPO, "web")
DEFAULT_WORKDIR = os.path.join(WEB_DIR, "build")
PAGE_FILES = ("index.html", "demo.js")
MODEL_FILE = "model.onnx"
# site path -> path under web/node_modules: OpenCV.js (the wasm is inside the file) and
# onnxruntime-web's wasm-only build with the runtime it loads.
VENDOR_FILES = {
    "vendor/opencv.js": "@techstark/opencv-js/dist/opencv.js",
    "vendor/ort/ort.wasm.min.mjs": "onnxruntime-web/dist/ort.wasm.min.mjs",
    "vendor/ort/ort-wasm-simd-threaded.mjs": "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs",
    "vendor/ort/ort-wasm-simd-threaded.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm",
}


class DemoError(RuntimeError):
    """The demo cannot be built: tools, packages or page files are missing."""


def export_model(checkpoint_path: str | None, workdir: str) -> str:
    """model.onnx of a checkpoint (None: the released FER+ weights), exported once and cached in
    WORKDIR/models/<key>/, the key naming the checkpoint folder, step and modification time."""
    from fermsca import checkpoint, export, inference

    path = inference.RELEASED_FERPLUS if checkpoint_path is None else checkpoint_path
    directory, step = checkpoint.find_checkpoint(path)
    step_dir = os.path.join(directory, str(step))
    stamp = f"{step_dir}:{os.stat(step_dir).st_mtime_ns}"
    key = f"step{step}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    cached = os.path.join(workdir, "models", key)
    model = os.path.join(cached, MODEL_FILE)
    if os.path.isfile(model):
        return model
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=key + ".", dir=os.path.dirname(cached))
    os.chmod(staging, 0o755)
    try:
        result = export.export(step_dir, staging, ["onnx"])
        diff = result["max_abs_diff"]["onnx"]
        if diff > export.TOLERANCE:
            raise DemoError(f"{step_dir}: the ONNX export differs from JAX by {diff:.2e} "
                            f"(more than {export.TOLERANCE:g})")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def class_names(model_path: str) -> list[str]:
    """The class names an exported model carries in its metadata ("class_names", JSON)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    if "class_names" not in props:
        raise DemoError(f"{model_path}: no 'class_names' in the model's metadata")
    return list(json.loads(props["class_names"]))


def install_packages(web_dir: str = WEB_DIR) -> None:
    """Runs `npm ci` in web/ unless every vendored file is already in web/node_modules."""
    modules = os.path.join(web_dir, "node_modules")
    if all(os.path.isfile(os.path.join(modules, f)) for f in VENDOR_FILES.values()):
        return
    if not os.path.isfile(os.path.join(web_dir, "package-lock.json")):
        raise DemoError(f"{web_dir}/package-lock.json not found: run the demo from a source checkout "
                        "of fermsca")
    npm = shutil.which("npm")
    if npm is None:
        raise DemoError("npm not found: install Node.js and npm (Debian: apt-get install nodejs npm), "
                        f"then rerun, or run `npm ci` in {web_dir}")
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=web_dir,
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DemoError(f"`npm ci` in {web_dir} failed (exit {done.returncode}): {last}")
    missing = [f for f in VENDOR_FILES.values() if not os.path.isfile(os.path.join(modules, f))]
    if missing:
        raise DemoError(f"`npm ci` in {web_dir} did not install {', '.join(missing)}; "
                        "check web/package.json")


def page_settings(names: Sequence[str]) -> dict:
    """What the page needs to find, crop and classify faces as `fermsca.faces` and
    `inference.LoadedModel.classify_image` do: detect_faces' defaults, margin 0, 48x48 crops."""
    from fermsca import faces

    defaults = inspect.signature(faces.detect_faces).parameters
    detect = {k: defaults[k].default for k in ("scale_factor", "min_neighbors", "min_size", "max_side")}
    return {"model": MODEL_FILE, "cascade": faces.CASCADE_FILE, "class_names": list(names),
            "face_size": faces.FACE_SIZE, "margin": 0.0, "detect": detect}


def build_site(checkpoint_path: str | None = None, workdir: str = DEFAULT_WORKDIR,
               web_dir: str = WEB_DIR) -> str:
    """Exports the model, installs the npm packages and assembles the page in WORKDIR/site/."""
    from fermsca import faces

    for name in PAGE_FILES:
        if not os.path.isfile(os.path.join(web_dir, name)):
            raise DemoError(f"{os.path.join(web_dir, name)} not found: run the demo from a source "
                            "checkout of fermsca")
    cascade = faces.cascade_path()
    model = export_model(checkpoint_path, workdir)
    install_packages(web_dir)
    site = os.path.join(workdir, "site")
    os.makedirs(os.path.join(site, "vendor", "ort"), exist_ok=True)
    copies = {name: os.path.join(web_dir, name) for name in PAGE_FILES}
    copies.update({k: os.path.join(web_dir, "node_modules", v) for k, v in VENDOR_FILES.items()})
    copies.update({MODEL_FILE: model, faces.CASCADE_FILE: cascade})
    for name, source in copies.items():
        shutil.copyfile(source, os.path.join(site, name))
    with open(os.path.join(site, "settings.json"), "w") as f:
        json.dump(page_settings(class_names(model)), f, indent=2)
    return site


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with JavaScript-module and wasm types; requests are not logged."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream",
                      ".xml": "application/xml"}

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def make_server(site: str, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A static file server of `site` (port 0: any free port; `server.server_address` tells)."""
    try:
        return http.server.ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=site))
    except OSError as e:
        raise DemoError(f"cannot serve on {host}:{port}: {e.strerror or e}; pass another --port "
                        "or --host") from e


def page_url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
    return f"http://{host}:{port}/"



# ---------------------------------------------------------------------------------------------
# Headless Chromium on the page, for its test and its benchmark.

CHROMIUM = "/usr/bin/chromium"
# A fake camera (--use-file-for-fake-video-capture=VIDEO.y4m adds the video) granted without asking.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--remote-debugging-pipe",
)


class Chromium:
    """Headless Chromium with a DevTools session on one page, on a pipe (--remote-debugging-pipe:
    JSON messages ending in a NUL byte, fd 3 in and fd 4 out), so no driver package is needed."""

    def __init__(self, args: Sequence[str], log_path: str, executable: str = CHROMIUM):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        actions = [(os.POSIX_SPAWN_DUP2, to_browser_r, 3), (os.POSIX_SPAWN_DUP2, from_browser_w, 4),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)]
        self.pid = os.posix_spawn(executable, [executable, *args], os.environ, file_actions=actions)
        for fd in (to_browser_r, from_browser_w, log):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self._session = None

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        """One DevTools command (to the page once `open` has attached to it); its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"{method}: no reply from Chromium in {timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"{method}: Chromium closed the DevTools pipe")
            self._buffer += chunk

    def open(self, url: str) -> None:
        """Opens `url` in a new page and attaches to it."""
        target = self.send("Target.createTarget", url=url)["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-like values)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: str) -> str:
        """Writes a PNG of the page's viewport to `path`; returns `path`."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Ends the browser (SIGTERM, SIGKILL after 10 s) and closes the pipes."""
        try:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.1)
        except ChildProcessError:
            pass
        os.close(self._to_browser)
        os.close(self._from_browser)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fermsca.demo",
                                description="Build and serve the in-browser webcam demo.")
    p.add_argument("--checkpoint", default=None,
                   help="training workdir or checkpoint folder (default: the released FER+ weights)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; browsers give the camera only to "
                        "localhost or HTTPS pages)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help="where the exported models and the page go (default web/build)")
    p.add_argument("--no-serve", dest="serve", action="store_false",
                   help="build the page only and print its directory")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port}: expected 0-65535", file=sys.stderr)
        return cli.EXIT_ERROR

    try:
        site = build_site(args.checkpoint, args.workdir)
        server = make_server(site, args.host, args.port) if args.serve else None
    except (*cli.anticipated_errors(), DemoError, ImportError) as e:
        if args.verbose:
            traceback.print_exc()
        print(cli.one_line(e), file=sys.stderr)
        return cli.EXIT_ERROR
    if server is None:
        print(site)
        return 0
    print(f"serving {site} at {page_url(server)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
