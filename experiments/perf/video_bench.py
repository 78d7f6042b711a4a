"""Speed of the video path of `fermsca.predict`: frames/s, and time per frame along the video.

    python -m experiments.perf.video_bench [--frames=300,1200] [--chunk=150] [--annotate=true]

For each length, writes a 640x480 mp4v video at 30 frames/s (two faces, 128 px, drifting slowly over
a textured background), then runs it through `predict.Predictor.video` as the CLI does (Haar
detection per frame, faces classified in batches of 64 by the released FER+ weights, tracks and
smoothing, with `--annotate` the annotated copy written too), after the model is compiled. Reports
frames/s overall and, per chunk of `--chunk` frames, the time per frame, to show that it does not
grow with the video's length; also Haar detection alone (ms/frame) and the model alone (ms/face).
The faces are FER2013 faces from the shared data when it is present, otherwise faces drawn by the
built-in synthetic dataset. Writes JSON to --output.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags

from fermsca import bench, faces, hostenv, inference, predict

_FRAMES = flags.DEFINE_list("frames", ["300", "1200"], "Lengths of the videos, in frames.")
_CHUNK = flags.DEFINE_integer("chunk", 150, "Frames per chunk of the per-chunk timing.")
_ANNOTATE = flags.DEFINE_bool("annotate", True, "Also write the annotated video (--annotate-video).")
_OUTPUT = flags.DEFINE_string(
    "output", str(Path(__file__).resolve().parents[1] / "results" / "bench" / "video_bench.json"),
    "Where to write the result as JSON; empty to skip.")

WIDTH, HEIGHT, FPS, FACE = 640, 480, 30.0, 128
PLACES = ((120, 150), (390, 170))  # top-left corners of the two faces at rest
FERPLUS_ARCHIVE = Path(__file__).resolve().parents[3] / "shared" / "data" / "ferplus-trainvalid.tar.gz"


def candidate_faces(count: int = 40) -> tuple[list[np.ndarray], str]:
    """48x48 grayscale faces: FER2013's from the shared data, else the synthetic dataset's."""
    if FERPLUS_ARCHIVE.is_file():
        import tarfile

        found = []
        with tarfile.open(FERPLUS_ARCHIVE, "r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".png"):
                    data = np.frombuffer(archive.extractfile(member).read(), np.uint8)
                    found.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))
                    if len(found) == count:
                        break
        return found, f"FER2013 faces from {FERPLUS_ARCHIVE.name}"
    from fermsca.datasets import synthetic_faces

    drawn = [synthetic_faces.draw_face(i % 8, np.random.default_rng(i)) for i in range(count)]
    return drawn, "faces drawn by fermsca.datasets.synthetic_faces"


def background() -> np.ndarray:
    """uint8 [H, W]: a lighting gradient with smoothed noise texture (deterministic)."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(70, 170, WIDTH)[None, :] + np.linspace(-20, 20, HEIGHT)[:, None]
    texture = cv2.GaussianBlur(rng.normal(0, 25, (HEIGHT, WIDTH)), (0, 0), 3)
    return np.clip(gradient + texture, 0, 255).astype(np.uint8)


def frame(two_faces: list[np.ndarray], index: int, base: np.ndarray) -> np.ndarray:
    canvas = base.copy()
    for k, (face, (x, y)) in enumerate(zip(two_faces, PLACES, strict=True)):
        dx = round(20 * np.sin(2 * np.pi * index / 90 + k))  # a slow drift, 3 s period
        dy = round(8 * np.cos(2 * np.pi * index / 120 + k))
        canvas[y + dy:y + dy + FACE, x + dx:x + dx + FACE] = cv2.resize(
            face, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    return canvas


def pick_faces(candidates: list[np.ndarray], base: np.ndarray) -> list[np.ndarray]:
    """The first two candidates that the cascade finds in each of a few frames of the drift."""
    chosen = []
    for face in candidates:
        if all(len(faces.detect_faces(frame([face, face], i, base))) == 2
               for i in (0, 23, 45, 68)):
            chosen.append(face)
            if len(chosen) == 2:
                return chosen
    raise RuntimeError("fewer than two candidate faces are found by the cascade")


def write_video(path: str, two_faces: list[np.ndarray], count: int, base: np.ndarray) -> None:
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write mp4v video")
    for i in range(count):
        writer.write(cv2.cvtColor(frame(two_faces, i, base), cv2.COLOR_GRAY2BGR))
    writer.release()


class TimedPredictor(predict.Predictor):
    """A Predictor that notes (frames done, wall seconds, CPU seconds of this process, since it
    was made) after each batch it flushes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.begin, self.begin_cpu = time.perf_counter(), time.process_time()
        self.marks = [(0, 0.0, 0.0)]

    def flush(self) -> None:
        super().flush()
        self.marks.append((self.summary.images, time.perf_counter() - self.begin,
                           time.process_time() - self.begin_cpu))


def chunk_times(marks: list[tuple[int, float, float]], chunk: int) -> list[dict]:
    """Wall and CPU time per frame between the first flushes that reach each multiple of `chunk`
    frames (and the last flush): frames are timed where their batch ends, so a chunk is whole
    batches. CPU time (all threads of this process) hardly changes when other processes take the
    cores; wall time does."""
    chunks, previous = [], marks[0]
    for mark in marks[1:]:
        frames = mark[0] - previous[0]
        if frames > 0 and (mark[0] >= (len(chunks) + 1) * chunk or mark == marks[-1]):
            chunks.append({"frames": [previous[0], mark[0]],
                           "ms_per_frame": round(1e3 * (mark[1] - previous[1]) / frames, 2),
                           "cpu_ms_per_frame": round(1e3 * (mark[2] - previous[2]) / frames, 2)})
            previous = mark
    return chunks


def run_video(loaded, classifier, path: str, out: str | None, chunk: int) -> dict:
    """The video path on one file: overall frames/s and time per frame per chunk."""
    records, errors = [], []

    def emit(record: dict) -> None:
        (errors if "error" in record else records).append(record)

    predictor = TimedPredictor(classifier, loaded.class_names, emit,
                               batch_size=classifier.batch_size)
    predictor.video(path, 1, annotate_video=out)
    summary = predictor.close()
    seconds = time.perf_counter() - predictor.begin
    cpu_seconds = time.process_time() - predictor.begin_cpu
    if errors:
        raise RuntimeError(f"{path}: {errors[0]}")
    chunks = chunk_times(predictor.marks, chunk)
    per_frame = {}
    for r in records:
        per_frame.setdefault(r["frame"], []).append(r)
    tracks = sorted({r["track"] for r in records if "track" in r})
    result = {
        "frames": summary.images, "seconds": round(seconds, 2),
        "frames_per_second": round(summary.images / seconds, 2),
        "cpu_ms_per_frame": round(1e3 * cpu_seconds / summary.images, 2),
        "faces": summary.faces, "frames_without_a_face": summary.no_face,
        "frames_with_both_faces": sum(1 for rs in per_frame.values() if len(rs) == 2),
        "track_ids": tracks, "chunks": chunks,
    }
    if out:
        capture = cv2.VideoCapture(out)
        result["annotated_video"] = {
            "frames": int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
            "size": [int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))],
            "fps": capture.get(cv2.CAP_PROP_FPS), "bytes": os.path.getsize(out)}
        capture.release()
    return result


def components(classifier, path: str, frames: int = 100) -> dict:
    """Haar detection alone on the first frames, and the model alone on full batches."""
    gray = [faces.to_gray(rgb) for index, rgb in predict.video_frames(path) if index < frames]
    begin = time.perf_counter()
    for image in gray:
        faces.detect_faces(image)
    detect_ms = 1e3 * (time.perf_counter() - begin) / len(gray)
    crops = np.random.default_rng(0).integers(0, 256, (classifier.batch_size * 4, 48, 48, 1),
                                              dtype=np.uint8)
    classifier(crops[:classifier.batch_size])  # compiled already; one more warm call
    begin = time.perf_counter()
    classifier(crops)
    classify_ms = 1e3 * (time.perf_counter() - begin) / len(crops)
    return {"haar_detect_ms_per_frame": round(detect_ms, 2),
            "model_ms_per_face_batch_64": round(classify_ms, 3), "frames_timed": len(gray)}


def main(argv):
    del argv
    hostenv.enable_compilation_cache(hostenv.default_compilation_cache())
    load_begin = os.getloadavg()
    loaded = inference.load()
    classifier = loaded.classifier(batch_size=64)
    classifier(np.zeros((1, 48, 48, 1), np.uint8))  # compile before timing
    base = background()
    candidates, source = candidate_faces()
    two = pick_faces(candidates, base)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(f) for f in _FRAMES.value):
            path = os.path.join(tmp, f"bench_{count}.mp4")
            write_video(path, two, count, base)
            out = os.path.join(tmp, f"bench_{count}_annotated.mp4") if _ANNOTATE.value else None
            result = {"video_frames": count, **run_video(loaded, classifier, path, out,
                                                         _CHUNK.value)}
            print(f"{count} frames: {result['frames_per_second']} frames/s, per chunk "
                  f"{[c['ms_per_frame'] for c in result['chunks']]} ms/frame (CPU "
                  f"{[c['cpu_ms_per_frame'] for c in result['chunks']]})")
            runs.append(result)
        parts = components(classifier, path)
    print(f"alone: Haar {parts['haar_detect_ms_per_frame']} ms/frame, model "
          f"{parts['model_ms_per_face_batch_64']} ms/face")
    record = {
        "command": shlex.join(["python", "-m", "experiments.perf.video_bench", *sys.argv[1:]]),
        "video": {"size": [WIDTH, HEIGHT], "fps": FPS, "codec": "mp4v", "faces_per_frame": 2,
                  "face_px": FACE, "faces_from": source},
        "model": "released FER+ weights (fermsca/released/ferplus), XLA convolutions, float32, "
                 "batch 64, no TTA",
        "path": "predict.Predictor.video, every frame: Haar detection, batched classification, "
                "IoU tracking and smoothing" + (", annotated video written" if _ANNOTATE.value
                                               else ""),
        "runs": runs,
        "components": parts,
        "cpu": bench.cpu_model(), "cpu_count": os.cpu_count(), "avx512": bench.avx512(),
        "load_average_start_end": [round(load_begin[0], 2), round(os.getloadavg()[0], 2)],
        "notes": "The 2 CPU cores were shared during the run with a low-priority background "
                 "training job (the CK+ cross-validation study) and with other processes (test "
                 "runs); the load average above shows how busy the machine was. Frames/s are "
                 "therefore lower than on an idle machine, and wall time per chunk varies with "
                 "what else ran; CPU time per chunk (this process's threads) is the steadier "
                 "check that the time per frame does not grow with the video's length.",
    }
    if _OUTPUT.value:
        bench.write_json(_OUTPUT.value, record)


if __name__ == "__main__":
    app.run(main)
