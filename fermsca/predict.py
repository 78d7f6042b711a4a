"""Facial expressions of the faces in image files, folders and videos.

    python -m fermsca.predict [--checkpoint DIR] [--tta] [--annotate OUTDIR] PATH...
    python -m fermsca.predict --video clip.mp4 --every_n_frames 15 [--annotate-video out.mp4]
    python -m fermsca.predict --webcam [N]      # camera N (default 0), live in a window

Faces are found with OpenCV's Haar cascade (`fermsca.faces`), cropped to a square (`--margin`),
converted to 48x48 grayscale and classified in jitted batches by `fermsca.inference` (the model
API; the default model is the released FER+ weights shipped with the package). Folders are searched
recursively, in sorted order, for files with a common image extension; files named on the command
line are always tried.

One JSON line per record on stdout:

    {"file": "a.jpg", "faces": 2, "face": 0, "box": [x, y, w, h], "label": "happiness",
     "score": 0.93, "probabilities": {"neutral": 0.01, ...}}    one per face, largest face first
    {"file": "b.jpg", "faces": 0}                                  no face found (not an error)
    {"file": "c.jpg", "error": "empty file (0 bytes)"}             the file cannot be used

Boxes are in pixels of the image as displayed (EXIF orientation applied). Video records also carry
"frame", the 0-based frame index, and each face record "track": the id (from 1) of the face
followed across the video's sampled frames (`fermsca.tracking`: IoU matching of boxes). A video
record's "probabilities", "label" and "score" are its track's moving average over frames
(`--smoothing`, the weight of the newest frame; 1 gives each frame's own output). A bad file never
stops the run; the exit status is 1 when any error record was written, 0 otherwise.

`--annotate-video` writes the video again (mp4v, the input's frame rate and size, every frame) with
boxes, track ids, labels and per-class probability bars (`fermsca.drawing`); frames between
sampled ones show the last sampled frame's faces. `--webcam` shows the same drawing live in a
window (`fermsca.webcam`) until q, Esc or the window is closed; it needs a display and a camera,
and says so in one line when either is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fermsca import cli, drawing, face_records, faces, hostenv, inference, tracking

DEFAULT_CHECKPOINT = inference.RELEASED_FERPLUS
MAX_MEGAPIXELS = 50.0
MAX_FILE_MB = 100.0
MAX_PENDING_MB = 256.0  # frames kept for drawing while their faces wait for a batch
VIDEO_FOURCC = "mp4v"
FALLBACK_FPS = 25.0  # for --annotate-video when the input does not state its frame rate
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".avif"})


class InputError(ValueError):
    """One input file or frame cannot be used; the message is the reason given in its record."""


# ----------------------------------------------------------------------------------------------
# Input: files, folders and video frames, each bad one turned into an InputError.


def read_image(path: str, *, max_megapixels: float = MAX_MEGAPIXELS,
               max_file_mb: float = MAX_FILE_MB) -> np.ndarray:
    """Reads an image file as uint8 RGB [H, W, 3], EXIF orientation applied.

    Pillow decodes what it can; other files are tried with OpenCV. Raises InputError naming the
    reason: missing or empty file, file or pixel count over the limits, not an image, corrupt or
    truncated data. The pixel count is checked from the header, before decoding.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})") from e
    if os.path.isdir(path):
        raise InputError("is a directory")
    if size == 0:
        raise InputError("empty file (0 bytes)")
    if size > max_file_mb * 2**20:
        raise InputError(f"file is {size / 2**20:.1f} MB, over the {max_file_mb:g} MB limit")
    max_pixels = max_megapixels * 1e6

    def check_pixels(width: int, height: int) -> None:
        if width * height > max_pixels:
            raise InputError(f"image is {width}x{height} ({width * height / 1e6:.1f} MP), over "
                             f"the {max_megapixels:g} MP limit")

    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's warning for large images is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixels(*image.size)
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large to decode safely ({e})") from e
    except UnidentifiedImageError:
        pass  # not a format Pillow knows: try OpenCV below
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"corrupt or truncated image ({e})") from e

    data = np.fromfile(path, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise InputError("not an image, or a format neither Pillow nor OpenCV reads")
    check_pixels(decoded.shape[1], decoded.shape[0])
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits
        pixels = np.asarray(image, dtype=np.uint16) >> 8
        return np.repeat(pixels.astype(np.uint8)[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def find_images(paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(file, annotation name) of every input: named files as given, folders searched recursively.

    Folder files are kept when their extension is in IMAGE_EXTENSIONS, in sorted order; their
    annotation name is their path relative to the folder. A folder with none yields (folder, "").
    """
    for path in paths:
        if not os.path.isdir(path):
            yield path, os.path.basename(path)
            continue
        found = False
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found = True
                    full = os.path.join(root, name)
                    yield full, os.path.relpath(full, path)
        if not found:
            yield path, ""


def video_frames(path: str, every_n_frames: int = 1, *,
                 max_megapixels: float = MAX_MEGAPIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, uint8 RGB [H, W, 3]) of every `every_n_frames`-th frame, from frame 0.

    Raises InputError when the file cannot be opened as a video, or no frame can be read.
    """
    if every_n_frames < 1:
        raise ValueError(f"every_n_frames must be >= 1, got {every_n_frames}")
    if not os.path.isfile(path):
        raise InputError("no such file")
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise InputError("cannot be opened as a video")
        index, sampled = 0, 0
        while True:
            if index % every_n_frames:
                if not capture.grab():
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                if frame.shape[0] * frame.shape[1] > max_megapixels * 1e6:
                    raise InputError(f"frames are {frame.shape[1]}x{frame.shape[0]}, over the "
                                     f"{max_megapixels:g} MP limit")
                sampled += 1
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if sampled == 0:
            raise InputError("no frame could be decoded")
    finally:
        capture.release()


def video_fps(path: str) -> float:
    """The frame rate a video file states, or FALLBACK_FPS when it states none."""
    capture = cv2.VideoCapture(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
    finally:
        capture.release()
    return float(fps) if np.isfinite(fps) and fps > 0 else FALLBACK_FPS


# ----------------------------------------------------------------------------------------------
# Running: faces of each input, classified in batches, records emitted in input order.


@dataclasses.dataclass
class _VideoRun:
    """One video on its way through the Predictor: its tracks and its annotated copy."""

    path: str
    out: str | None = None  # --annotate-video file
    fps: float = FALLBACK_FPS
    tracks: tracking.TrackerState = dataclasses.field(default_factory=tracking.TrackerState)
    shown: list = dataclasses.field(default_factory=list)  # records drawn on unsampled frames
    writer: Any = None  # cv2.VideoWriter, opened at the first frame
    failed: bool = False


@dataclasses.dataclass
class _Item:
    """One image or frame on its way to records."""

    source: dict  # {"file": ...} and, for videos, "frame"
    boxes: list = dataclasses.field(default_factory=list)
    crops: list = dataclasses.field(default_factory=list)
    image: np.ndarray | None = None  # RGB, kept only for annotation
    annotate_name: str = ""
    error: str | None = None
    video: _VideoRun | None = None
    sampled: bool = True  # False: a video frame only drawn (--annotate-video), not classified


@dataclasses.dataclass
class Summary:
    """Counts of one run: images (and frames) read, faces, images without a face, error records."""

    images: int = 0
    faces: int = 0
    no_face: int = 0
    errors: int = 0


def _describe(error: Exception) -> str:
    if isinstance(error, InputError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class Predictor:
    """Turns inputs into records; call `image`/`video` per input, then `close`."""

    def __init__(self, classifier: Callable[[np.ndarray], np.ndarray], class_names: Sequence[str],
                 emit: Callable[[dict], None], *, detect: bool = True, margin: float = 0.0,
                 annotate_dir: str | None = None, max_megapixels: float = MAX_MEGAPIXELS,
                 max_file_mb: float = MAX_FILE_MB, batch_size: int = 64,
                 smoothing: float = tracking.DEFAULT_SMOOTHING):
        tracking.ema(0.0, 0.0, smoothing)  # checks the range
        self.classifier = classifier
        self.class_names = tuple(class_names)
        self.emit = emit
        self.detect = detect
        self.margin = margin
        self.annotate_dir = annotate_dir
        self.max_megapixels = max_megapixels
        self.max_file_mb = max_file_mb
        self.batch_size = batch_size
        self.smoothing = smoothing
        self.summary = Summary()
        self._pending: list[_Item] = []
        self._pending_crops = 0
        self._pending_bytes = 0
        self._written: set[str] = set()

    def _add(self, item: _Item) -> None:
        self._pending.append(item)
        self._pending_crops += len(item.crops)
        self._pending_bytes += 0 if item.image is None else item.image.nbytes
        if (self._pending_crops >= self.batch_size or len(self._pending) >= self.batch_size
                or self._pending_bytes > MAX_PENDING_MB * 2**20):
            self.flush()

    def _item(self, source: dict, rgb: np.ndarray, annotate_name: str,
              keep_image: bool = False) -> _Item:
        try:
            boxes, crops = inference.face_crops(rgb, detect=self.detect, margin=self.margin)
        except faces.FaceDetectorError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad image must not stop the run
            return _Item(source, error=_describe(e))
        keep = rgb if self.annotate_dir or keep_image else None
        return _Item(source, boxes, crops, keep, annotate_name)

    def image(self, path: str, annotate_name: str | None = None) -> None:
        """Queues the faces of one image file (or an error record)."""
        name = os.path.basename(path) if annotate_name is None else annotate_name
        source = {"file": path}
        if not name:
            self._add(_Item(source, error="no image files found in this folder"))
            return
        try:
            rgb = read_image(path, max_megapixels=self.max_megapixels,
                             max_file_mb=self.max_file_mb)
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError on a huge image
            self._add(_Item(source, error=_describe(e)))
            return
        self._add(self._item(source, rgb, name))

    def video(self, path: str, every_n_frames: int = 1, annotate_video: str | None = None) -> None:
        """Queues the faces of every `every_n_frames`-th frame of a video file, followed across
        frames; with `annotate_video`, every frame is also drawn into that video file."""
        stem = os.path.splitext(os.path.basename(path))[0]
        run = _VideoRun(path, annotate_video)
        if annotate_video:
            run.fps = video_fps(path)
        frame_index = None
        try:
            # An annotated copy needs every frame decoded; otherwise only the sampled ones are.
            step = 1 if annotate_video else every_n_frames
            for frame_index, rgb in video_frames(path, step, max_megapixels=self.max_megapixels):
                source = {"file": path, "frame": frame_index}
                if frame_index % every_n_frames:
                    item = _Item(source, image=rgb, sampled=False)
                else:
                    item = self._item(source, rgb, f"{stem}_frame{frame_index:06d}.png",
                                      keep_image=bool(annotate_video))
                item.video = run
                self._add(item)
        except faces.FaceDetectorError:
            raise
        except Exception as e:  # noqa: BLE001
            source = {"file": path}
            if frame_index is not None:
                source["frame"] = frame_index
            self._add(_Item(source, error=_describe(e)))
        if annotate_video:
            self.flush()
            if run.writer is not None:
                run.writer.release()

    def flush(self) -> None:
        """Classifies the queued faces and emits the queued records in order."""
        crops = [c for item in self._pending for c in item.crops]
        probs = self.classifier(np.stack(crops)[..., None]) if crops else None
        used = 0
        for item in self._pending:
            if item.error is not None:
                self.summary.errors += 1
                self.emit({**item.source, "error": item.error})
                continue
            run = item.video
            if not item.sampled:
                self._write_frame(run, item.image, run.shown)
                continue
            self.summary.images += 1
            item_probs = probs[used:used + len(item.crops)] if item.crops else []
            used += len(item.crops)
            if run is None:
                records = face_records.of_frame(item.source, item.boxes, item_probs, self.class_names)
            else:
                run.tracks, records = face_records.of_tracked_frame(
                    run.tracks, item.source, item.boxes, item_probs, self.class_names,
                    smoothing=self.smoothing)
            self._count(records)
            for record in records:
                self.emit(record)
            if self.annotate_dir:
                try:
                    self._annotate(item, records)
                except Exception as e:  # noqa: BLE001
                    self.summary.errors += 1
                    self.emit({**item.source, "error": f"annotated image not written: "
                                                       f"{_describe(e)}"})
            if run is not None and run.out:
                run.shown = records
                self._write_frame(run, item.image, records)
        self._pending, self._pending_crops, self._pending_bytes = [], 0, 0

    def _count(self, records: list[dict]) -> None:
        if records[0]["faces"]:
            self.summary.faces += len(records)
        else:
            self.summary.no_face += 1

    def _write_frame(self, run: _VideoRun, rgb: np.ndarray, records: list[dict]) -> None:
        if run.failed:
            return
        try:
            if run.writer is None:
                if os.path.dirname(run.out):
                    os.makedirs(os.path.dirname(run.out), exist_ok=True)
                height, width = rgb.shape[:2]
                run.writer = cv2.VideoWriter(run.out, cv2.VideoWriter_fourcc(*VIDEO_FOURCC),
                                             run.fps, (width, height))
                if not run.writer.isOpened():
                    raise OSError(f"OpenCV cannot write {VIDEO_FOURCC} video to {run.out}")
            drawn = drawing.draw_annotations(rgb, records, bars=True)
            run.writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        except Exception as e:  # noqa: BLE001 - the records go on; the video is reported once
            run.failed = True
            self.summary.errors += 1
            self.emit({"file": run.path, "error": f"annotated video {run.out} not written: "
                                                  f"{_describe(e)}"})

    def _annotate(self, item: _Item, records: list[dict]) -> None:
        path = self._annotation_path(item.annotate_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        drawn = drawing.draw_annotations(item.image, records, bars=item.video is not None)
        if not cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: OpenCV could not write the annotated image")

    def _annotation_path(self, name: str) -> str:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}:
            stem, ext = name, ".png"
        path = os.path.join(self.annotate_dir, stem + ext)
        n = 1
        while path in self._written:  # same name from two inputs: keep both
            path = os.path.join(self.annotate_dir, f"{stem}_{n}{ext}")
            n += 1
        self._written.add(path)
        return path

    def close(self) -> Summary:
        self.flush()
        return self.summary


# ----------------------------------------------------------------------------------------------
# The command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fermsca.predict",
        description="Facial expression of each face in images, folders and videos: one JSON "
                    "line per face on stdout. Exit status 1 if any input could not be used.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="training workdir or checkpoint folder (default: the released FER+ "
                        "weights, fermsca/released/ferplus in the installed package)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="a video file to sample frames from (repeatable)")
    p.add_argument("--every_n_frames", type=int, default=1,
                   help="video: classify frames 0, n, 2n, ... (default 1)")
    p.add_argument("--annotate-video", dest="annotate_video", action="append", default=[],
                   metavar="OUT.mp4",
                   help="write the --video FILE with boxes, track ids, labels and probability "
                        "bars drawn (mp4v, same frame rate and size); one per --video, in order")
    p.add_argument("--smoothing", type=float, default=tracking.DEFAULT_SMOOTHING,
                   help="video and webcam: weight of the newest frame in each face's moving "
                        f"average of probabilities, in (0, 1]; 1 turns smoothing off (default "
                        f"{tracking.DEFAULT_SMOOTHING:g}: a change shows 90%% after 7 frames)")
    p.add_argument("--webcam", nargs="?", type=int, const=0, default=None, metavar="N",
                   help="classify camera N (default 0) live in a window; q or Esc quits")
    p.add_argument("--no-detect", dest="detect", action="store_false",
                   help="treat each image as an already-cropped face (its centred square)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="crop margin on every side, as a fraction of the face box (default 0)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over flips and small shifts")
    p.add_argument("--annotate", metavar="OUTDIR",
                   help="write each image with boxes and labels drawn to OUTDIR")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_megapixels", type=float, default=MAX_MEGAPIXELS,
                   help=f"larger images are refused (default {MAX_MEGAPIXELS:g})")
    p.add_argument("--max_file_mb", type=float, default=MAX_FILE_MB,
                   help=f"larger files are refused (default {MAX_FILE_MB:g})")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.webcam is not None:
        if args.paths or args.video or args.annotate or args.annotate_video:
            parser.error("--webcam runs alone: give it without PATH, --video, --annotate or "
                         "--annotate-video")
        if args.webcam < 0:
            parser.error(f"--webcam N: N is a camera index >= 0, got {args.webcam}")
    elif not args.paths and not args.video:
        parser.error("give at least one PATH or --video FILE, or --webcam")
    if args.every_n_frames < 1 or args.margin < 0 or args.batch_size < 1:
        parser.error("--every_n_frames and --batch_size must be >= 1, --margin >= 0")
    if args.annotate_video and len(args.annotate_video) != len(args.video):
        parser.error(f"give one --annotate-video OUT.mp4 per --video FILE, in the same order "
                     f"({len(args.annotate_video)} for {len(args.video)})")
    outs = [os.path.abspath(out) for out in args.annotate_video]
    clash = set(outs) & {os.path.abspath(v) for v in args.video}
    if clash or len(set(outs)) < len(outs):
        parser.error("each --annotate-video OUT.mp4 must be a file of its own: not a --video "
                     "input, and not given twice")
    if not 0 < args.smoothing <= 1:
        parser.error(f"--smoothing must be in (0, 1], got {args.smoothing:g}")


def _webcam(args: argparse.Namespace) -> int:
    from fermsca import webcam  # here, not above: tkinter and the window only for --webcam

    def load() -> inference.LoadedModel:
        if args.detect:
            faces.cascade_path()
        return inference.load(args.checkpoint)

    try:
        shown = webcam.run_webcam(args.webcam, load, detect=args.detect, margin=args.margin,
                                  tta=args.tta, smoothing=args.smoothing)
    except (webcam.DisplayError, webcam.CameraError, *cli.anticipated_errors()) as e:
        if args.verbose:
            traceback.print_exc()
        print(cli.one_line(e), file=sys.stderr)
        return cli.EXIT_ERROR
    except KeyboardInterrupt:
        return 0
    print(f"camera {args.webcam}: {shown} frame(s) shown", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    hostenv.enable_compilation_cache(hostenv.default_compilation_cache())
    if not os.path.exists(args.checkpoint):
        what = ("the released FER+ weights are not in this copy"
                if args.checkpoint == DEFAULT_CHECKPOINT else "no such directory")
        print(f"error: checkpoint {args.checkpoint}: {what}; pass --checkpoint DIR (a training "
              "workdir or checkpoint folder)", file=sys.stderr)
        return 2
    if args.webcam is not None:
        return _webcam(args)
    try:
        if args.detect:
            faces.cascade_path()
        loaded = inference.load(args.checkpoint)
    except cli.anticipated_errors() as e:
        if args.verbose:
            traceback.print_exc()
        print(cli.one_line(e), file=sys.stderr)
        return cli.EXIT_ERROR
    classifier = loaded.classifier(tta=args.tta, batch_size=args.batch_size)

    def emit(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    predictor = Predictor(classifier, loaded.class_names, emit, detect=args.detect,
                          margin=args.margin, annotate_dir=args.annotate,
                          max_megapixels=args.max_megapixels, max_file_mb=args.max_file_mb,
                          batch_size=classifier.batch_size, smoothing=args.smoothing)
    for path, name in find_images(args.paths):
        predictor.image(path, name)
    for i, path in enumerate(args.video):
        out = args.annotate_video[i] if args.annotate_video else None
        predictor.video(path, args.every_n_frames, annotate_video=out)
    s = predictor.close()
    print(f"{s.images} image(s)/frame(s): {s.faces} face(s), {s.no_face} without a face, "
          f"{s.errors} error(s)", file=sys.stderr)
    return 1 if s.errors else 0


if __name__ == "__main__":
    sys.exit(main())
