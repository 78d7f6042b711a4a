"""Facial expressions of the faces in image files, folders and videos.

    python -m fermsca.predict [--checkpoint DIR] [--tta] [--annotate OUTDIR] PATH...
    python -m fermsca.predict --video clip.mp4 --every_n_frames 15

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
"frame", the 0-based frame index. A bad file never stops the run; the exit status is 1 when any
error record was written, 0 otherwise.
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

from fermsca import cli, faces, hostenv, inference

DEFAULT_CHECKPOINT = inference.RELEASED_FERPLUS
MAX_MEGAPIXELS = 50.0
MAX_FILE_MB = 100.0
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


# ----------------------------------------------------------------------------------------------
# Running: faces of each input, classified in batches, records emitted in input order.


@dataclasses.dataclass
class _Item:
    """One image or frame on its way to records."""

    source: dict  # {"file": ...} and, for videos, "frame"
    boxes: list = dataclasses.field(default_factory=list)
    crops: list = dataclasses.field(default_factory=list)
    image: np.ndarray | None = None  # RGB, kept only for annotation
    annotate_name: str = ""
    error: str | None = None


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
                 max_file_mb: float = MAX_FILE_MB, batch_size: int = 64):
        self.classifier = classifier
        self.class_names = tuple(class_names)
        self.emit = emit
        self.detect = detect
        self.margin = margin
        self.annotate_dir = annotate_dir
        self.max_megapixels = max_megapixels
        self.max_file_mb = max_file_mb
        self.batch_size = batch_size
        self.summary = Summary()
        self._pending: list[_Item] = []
        self._pending_crops = 0
        self._written: set[str] = set()

    def _add(self, item: _Item) -> None:
        self._pending.append(item)
        self._pending_crops += len(item.crops)
        if self._pending_crops >= self.batch_size or len(self._pending) >= self.batch_size:
            self.flush()

    def _item(self, source: dict, rgb: np.ndarray, annotate_name: str) -> _Item:
        try:
            boxes, crops = inference.face_crops(rgb, detect=self.detect, margin=self.margin)
        except faces.FaceDetectorError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad image must not stop the run
            return _Item(source, error=_describe(e))
        keep = rgb if self.annotate_dir else None
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

    def video(self, path: str, every_n_frames: int = 1) -> None:
        """Queues the faces of every `every_n_frames`-th frame of a video file."""
        stem = os.path.splitext(os.path.basename(path))[0]
        frame_index = None
        try:
            for frame_index, rgb in video_frames(path, every_n_frames,
                                                 max_megapixels=self.max_megapixels):
                source = {"file": path, "frame": frame_index}
                self._add(self._item(source, rgb, f"{stem}_frame{frame_index:06d}.png"))
        except faces.FaceDetectorError:
            raise
        except Exception as e:  # noqa: BLE001
            source = {"file": path}
            if frame_index is not None:
                source["frame"] = frame_index
            self._add(_Item(source, error=_describe(e)))

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
            self.summary.images += 1
            item_probs = probs[used:used + len(item.crops)] if item.crops else []
            used += len(item.crops)
            records = self._records(item, item_probs)
            for record in records:
                self.emit(record)
            if self.annotate_dir:
                try:
                    self._annotate(item, records)
                except Exception as e:  # noqa: BLE001
                    self.summary.errors += 1
                    self.emit({**item.source, "error": f"annotated image not written: "
                                                       f"{_describe(e)}"})
        self._pending, self._pending_crops = [], 0

    def _records(self, item: _Item, probs: Any) -> list[dict]:
        count = len(item.boxes)
        if not count:
            self.summary.no_face += 1
            return [{**item.source, "faces": 0}]
        self.summary.faces += count
        records = []
        for i, (box, p) in enumerate(zip(item.boxes, probs, strict=True)):
            k = int(np.argmax(p))
            records.append({
                **item.source, "faces": count, "face": i, "box": [int(v) for v in box],
                "label": self.class_names[k], "score": round(float(p[k]), 6),
                "probabilities": {n: round(float(v), 6) for n, v in zip(self.class_names, p,
                                                                        strict=True)},
            })
        return records

    def _annotate(self, item: _Item, records: list[dict]) -> None:
        path = self._annotation_path(item.annotate_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        drawn = draw_annotations(item.image, records)
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


def draw_annotations(rgb: np.ndarray, records: Sequence[dict]) -> np.ndarray:
    """A copy of an RGB image with each face record's box, label and score drawn on it."""
    out = np.ascontiguousarray(rgb).copy()
    thickness = max(1, round(min(out.shape[:2]) / 250))
    font_scale = max(0.4, thickness * 0.5)
    for record in records:
        if "box" not in record:
            continue
        x, y, w, h = record["box"]
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 255, 0), thickness)
        text = f"{record['label']} {record['score']:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = y - th - base - 2 if y - th - base - 2 >= 0 else y + h
        cv2.rectangle(out, (x, top), (x + tw + 2, top + th + base + 2), (0, 255, 0), -1)
        cv2.putText(out, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
    return out


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    hostenv.enable_compilation_cache(hostenv.default_compilation_cache())
    if not args.paths and not args.video:
        _parser().error("give at least one PATH or --video FILE")
    if args.every_n_frames < 1 or args.margin < 0 or args.batch_size < 1:
        _parser().error("--every_n_frames and --batch_size must be >= 1, --margin >= 0")
    if not os.path.exists(args.checkpoint):
        what = ("the released FER+ weights are not in this copy"
                if args.checkpoint == DEFAULT_CHECKPOINT else "no such directory")
        print(f"error: checkpoint {args.checkpoint}: {what}; pass --checkpoint DIR (a training "
              "workdir or checkpoint folder)", file=sys.stderr)
        return 2
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
                          batch_size=classifier.batch_size)
    for path, name in find_images(args.paths):
        predictor.image(path, name)
    for path in args.video:
        predictor.video(path, args.every_n_frames)
    s = predictor.close()
    print(f"{s.images} image(s)/frame(s): {s.faces} face(s), {s.no_face} without a face, "
          f"{s.errors} error(s)", file=sys.stderr)
    return 1 if s.errors else 0


if __name__ == "__main__":
    sys.exit(main())
