"""Prediction: reading files, folders and videos, bad inputs, and the CLI's records (the model API
is tested in test_inference.py, the drawing in test_drawing.py, the live path in test_webcam.py)."""

import functools
import json
import os
import struct
import zlib

import cv2
import haar_margin
import jax
import numpy as np
import pytest
import tiny_run
from fixtures import CLIP_FRAMES, left_right_tracks
from PIL import Image

from fermsca import inference, predict

CLASS_NAMES = tiny_run.CLASS_NAMES
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERPLUS_TARBALL = os.path.join(REPO, "..", "shared", "data", "ferplus-trainvalid.tar.gz")


def jitted_probabilities(model, variables, images, **kwargs) -> np.ndarray:
    fn = jax.jit(functools.partial(inference.probabilities, model=model, **kwargs))
    return np.asarray(fn(variables, images))


def faces_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Reading files: every bad case is an InputError naming the reason


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))


def write_png(path, image: np.ndarray) -> str:
    Image.fromarray(image).save(path)
    return str(path)


def test_read_image_reads_common_formats(tmp_path):
    gray = faces_batch(1)[0, :, :, 0]
    for name in ("a.png", "b.bmp", "c.tif"):
        rgb = predict.read_image(write_png(tmp_path / name, gray))
        assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb[:, :, 1], gray)
    jpeg = predict.read_image(write_png(tmp_path / "d.jpg", gray))
    assert np.abs(jpeg[:, :, 0].astype(int) - gray).mean() < 40
    sixteen = (gray.astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "e.png")
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "e.png"))[:, :, 0], gray)


def test_read_image_applies_exif_orientation(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert predict.read_image(str(tmp_path / "r.jpg")).shape == (40, 20, 3)


@pytest.mark.parametrize("case, reason", [
    ("missing", "No such file"),
    ("empty", "empty file"),
    ("text_named_jpg", "not an image"),
    ("truncated_png", "truncated"),
    ("enormous_header_png", "too large to decode safely"),
    ("large_header_png", r"8000x8000 \(64.0 MP\), over the 50 MP limit"),
])
def test_read_image_bad_files(tmp_path, case, reason):
    path = tmp_path / "x.jpg"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text_named_jpg":
        path.write_text("these are not the pixels you are looking for\n")
    elif case == "truncated_png":
        path = tmp_path / "x.png"
        write_png(path, faces_batch(1)[0, :, :, 0])
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case == "enormous_header_png":
        path = tmp_path / "x.png"
        path.write_bytes(png_header_only(100_000, 100_000))
    elif case == "large_header_png":
        path = tmp_path / "x.png"
        path.write_bytes(png_header_only(8000, 8000))
    with pytest.raises(predict.InputError, match=reason):
        predict.read_image(str(path))


def test_read_image_limits_are_settable(tmp_path):
    path = write_png(tmp_path / "x.png", faces_batch(1)[0, :, :, 0])
    with pytest.raises(predict.InputError, match=r"48x48 \(0.0 MP\), over the 0.001 MP limit"):
        predict.read_image(path, max_megapixels=0.001)
    with pytest.raises(predict.InputError, match="over the 0.0001 MB limit"):
        predict.read_image(path, max_file_mb=0.0001)


def test_find_images_scans_folders_recursively_in_order(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.png", "sub/deeper/d.webp", "0/e.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "nothing").mkdir()
    found = list(predict.find_images([str(tmp_path), str(tmp_path / "notes.txt"),
                                      str(tmp_path / "nothing")]))
    names = [name for _, name in found]
    assert names == ["a.JPG", "b.png", "0/e.bmp", "sub/c.png", "sub/deeper/d.webp", "notes.txt",
                     ""]
    assert found[-1] == (str(tmp_path / "nothing"), "")


# ---------------------------------------------------------------------------------------------
# Predictor: records in input order across batches; the CLI end to end


def mean_classifier(calls: list):
    """Stands in for a model: class = mean pixel // 32, as one-hot probabilities."""

    def classify(crops: np.ndarray) -> np.ndarray:
        calls.append(len(crops))
        k = (crops.reshape(len(crops), -1).mean(axis=1) // 32).astype(int)
        return np.eye(len(CLASS_NAMES), dtype=np.float32)[k]

    return classify


def test_predictor_keeps_input_order_across_batches(tmp_path):
    paths = []
    for i, value in enumerate([10, 40, None, 70, 100, None, 130, 250]):
        path = tmp_path / f"{i}.png"
        if value is None:
            path.write_bytes(b"")
        else:
            write_png(path, np.full((30, 30), value, np.uint8))
        paths.append(str(path))
    records, calls = [], []
    predictor = predict.Predictor(mean_classifier(calls), CLASS_NAMES, records.append,
                                  detect=False, batch_size=2)
    for path in paths:
        predictor.image(path)
    summary = predictor.close()
    assert [r["file"] for r in records] == paths
    assert [r.get("label") for r in records] == [
        "neutral", "happiness", None, "surprise", "sadness", None, "anger", "contempt"]
    assert [r.get("error") for r in records].count("empty file (0 bytes)") == 2
    assert all(r["box"] == [0, 0, 30, 30] for r in records if "box" in r)
    assert max(calls) <= 2 and sum(calls) == 6
    assert (summary.images, summary.faces, summary.no_face, summary.errors) == (6, 6, 0, 2)


def run_cli(capsys, argv):
    status = predict.main(argv)
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()], captured.err


FACE_KEYS = {"file", "faces", "face", "box", "label", "score", "probabilities"}


def check_face_record(record):
    assert set(record) - {"frame", "track"} == FACE_KEYS
    probs = record["probabilities"]
    assert list(probs) == CLASS_NAMES
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert record["label"] == max(probs, key=probs.get)
    assert record["score"] == max(probs.values())
    assert len(record["box"]) == 4 and all(isinstance(v, int) for v in record["box"])


def test_cli_without_detection_reports_every_file(workdir, tiny_model, tmp_path, capsys):
    _, model, variables = tiny_model
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    face = faces_batch(1, seed=3)[0, :, :, 0]
    write_png(folder / "a_face.png", face)
    write_png(folder / "b_wide.jpg", np.zeros((64, 80, 3), np.uint8) + 90)
    (folder / "c_empty.png").write_bytes(b"")
    write_png(folder / "d_trunc.png", face)
    data = (folder / "d_trunc.png").read_bytes()
    (folder / "d_trunc.png").write_bytes(data[:len(data) // 2])
    (folder / "e_notes.jpg").write_text("not an image")
    (folder / "f_huge.png").write_bytes(png_header_only(100_000, 100_000))
    write_png(folder / "sub" / "g_flat.png", np.full((48, 48), 200, np.uint8))
    missing = str(tmp_path / "missing.png")
    annotated = tmp_path / "annotated"

    status, records, err = run_cli(capsys, [
        "--checkpoint", workdir, "--no-detect", "--tta", "--annotate", str(annotated),
        str(folder), missing])
    assert status == 1
    assert "3 image(s)/frame(s): 3 face(s), 0 without a face, 5 error(s)" in err
    names = [os.path.relpath(r["file"], folder) if r["file"] != missing else "missing"
             for r in records]
    assert names == ["a_face.png", "b_wide.jpg", "c_empty.png", "d_trunc.png", "e_notes.jpg",
                     "f_huge.png", os.path.join("sub", "g_flat.png"), "missing"]
    errors = {name: r["error"] for name, r in zip(names, records, strict=True) if "error" in r}
    assert all(set(r) == {"file", "error"} for r in records if "error" in r)
    assert "empty file" in errors["c_empty.png"]
    assert "truncated" in errors["d_trunc.png"]
    assert "not an image" in errors["e_notes.jpg"]
    assert "too large" in errors["f_huge.png"]
    assert "No such file" in errors["missing"]
    for record in records:
        if "error" not in record:
            check_face_record(record)
    assert records[1]["box"] == [8, 0, 64, 64]  # the centred square of an 80x64 image
    # The face went through exactly the model's preprocessing, with TTA.
    expected = jitted_probabilities(model, variables, face[None, :, :, None], tta=True)
    np.testing.assert_allclose(list(records[0]["probabilities"].values()), expected[0],
                               atol=2e-6)
    written = sorted(os.path.relpath(os.path.join(d, f), annotated)
                     for d, _, fs in os.walk(annotated) for f in fs)
    assert written == ["a_face.png", "b_wide.jpg", os.path.join("sub", "g_flat.png")]
    assert cv2.imread(str(annotated / "b_wide.jpg")).shape == (64, 80, 3)


def ferplus_face(index: int) -> np.ndarray:
    import tarfile

    if not os.path.isfile(FERPLUS_TARBALL):
        pytest.skip(f"shared FER+ data not found at {os.path.normpath(FERPLUS_TARBALL)}")
    seen = 0
    with tarfile.open(FERPLUS_TARBALL, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".png"):
                if seen == index:
                    data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
                seen += 1
    raise AssertionError("tarball has too few faces")


def test_cli_detects_a_real_face_and_reports_images_without_one(workdir, tiny_model, tmp_path,
                                                                capsys):
    from fermsca import faces

    _, model, variables = tiny_model
    def paste(face, _=0):
        canvas = np.full((400, 480), 128, np.uint8)
        canvas[100:292, 150:342] = cv2.resize(face, (192, 192), interpolation=cv2.INTER_CUBIC)
        return canvas

    clear = haar_margin.clear_faces((ferplus_face(i) for i in range(24)), paste, count=1, draws=1,
                                    where=(150, 100, 192, 192), min_iou=0.7)
    assert clear, "no face of the sample is found with a clear margin"
    canvas = paste(clear[0])
    photo = write_png(tmp_path / "photo.png", np.stack([canvas] * 3, axis=-1))
    flat = write_png(tmp_path / "flat.png", np.full((300, 300), 90, np.uint8))
    status, records, _ = run_cli(capsys, ["--checkpoint", workdir, photo, flat])
    assert status == 0
    face, no_face = records
    check_face_record(face)
    assert face["file"] == photo and face["faces"] == 1 and face["face"] == 0
    x, y, w, h = face["box"]
    assert abs(x + w / 2 - 246) < 20 and abs(y + h / 2 - 196) < 20 and 150 < w < 240
    crop = faces.crop_face(canvas, face["box"])
    expected = jitted_probabilities(model, variables, crop[None, :, :, None])
    np.testing.assert_allclose(list(face["probabilities"].values()), expected[0], atol=2e-6)
    assert no_face == {"file": flat, "faces": 0}


def test_cli_samples_video_frames(workdir, tmp_path, capsys):
    video = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    rng = np.random.default_rng(0)
    for _ in range(7):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    bogus = tmp_path / "bogus.mp4"
    bogus.write_text("not a video")
    annotated = tmp_path / "annotated"
    status, records, _ = run_cli(capsys, [
        "--checkpoint", workdir, "--no-detect", "--video", video, "--every_n_frames", "3",
        "--video", str(bogus), "--annotate", str(annotated)])
    assert status == 1
    assert [r.get("frame") for r in records[:3]] == [0, 3, 6]
    for record in records[:3]:
        check_face_record(record)
        assert record["file"] == video and record["box"] == [8, 0, 48, 48]
    assert records[3]["file"] == str(bogus) and "video" in records[3]["error"]
    assert sorted(os.listdir(annotated)) == [f"clip_frame{i:06d}.png" for i in (0, 3, 6)]


def test_cli_without_released_weights_says_to_pass_a_checkpoint(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(predict, "DEFAULT_CHECKPOINT", str(tmp_path / "released" / "ferplus"))
    assert predict.main([str(tmp_path)]) == 2
    assert "pass --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([])


# ---------------------------------------------------------------------------------------------
# Videos with faces (conftest's face_clip): tracks, smoothing, the annotated video


def read_video(path):
    capture = cv2.VideoCapture(path)
    fps, count = capture.get(cv2.CAP_PROP_FPS), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return fps, int(count), frames


def test_cli_annotates_a_video_and_follows_its_faces(workdir, tiny_model, face_clip, tmp_path,
                                                      capsys):
    from fermsca import faces

    _, model, variables = tiny_model
    clip, decoded = face_clip
    out = tmp_path / "out" / "annotated.mp4"
    status, records, err = run_cli(capsys, [
        "--checkpoint", workdir, "--video", clip, "--every_n_frames", "2", "--batch_size", "4",
        "--annotate-video", str(out), "--smoothing", "0.5"])
    assert status == 0, err
    assert "6 image(s)/frame(s): 12 face(s), 0 without a face, 0 error(s)" in err
    assert [r["frame"] for r in records] == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10]
    for record in records:
        check_face_record(record)
        assert record["file"] == clip and record["faces"] == 2
    # The faces keep their tracks although the cascade lists them largest first, in either order.
    assert set(left_right_tracks(records).values()) in ({(1, 2)}, {(2, 1)})

    # Each face's probabilities are the moving average (weight 0.5) of the model's, frame by frame.
    crops = [faces.crop_face(faces.to_gray(decoded[r["frame"]]), r["box"]) for r in records]
    raws = jitted_probabilities(model, variables, np.stack(crops)[..., None])
    smoothed = {}
    for record, raw in zip(records, raws, strict=True):
        previous = smoothed.get(record["track"])
        smoothed[record["track"]] = raw if previous is None else 0.5 * raw + 0.5 * previous
        np.testing.assert_allclose(list(record["probabilities"].values()),
                                   smoothed[record["track"]], atol=2e-6)

    # The annotated copy: every frame (sampled or not), the input's size and frame rate, drawn on.
    fps, count, frames = read_video(str(out))
    assert (fps, count, len(frames)) == (10.0, CLIP_FRAMES, CLIP_FRAMES)
    assert frames[0].shape == decoded[0].shape == (240, 320, 3)
    for annotated, plain in zip(frames, decoded, strict=True):
        assert np.abs(annotated.astype(int) - plain).mean() > 5  # boxes, labels, darkened panels


def test_annotated_video_that_cannot_be_written_is_an_error_record(face_clip, tmp_path):
    clip, _ = face_clip
    records, calls = [], []
    predictor = predict.Predictor(mean_classifier(calls), CLASS_NAMES, records.append,
                                  batch_size=64)
    predictor.video(clip, every_n_frames=4, annotate_video=str(tmp_path))  # a folder
    summary = predictor.close()
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["file"] == clip
    assert errors[0]["error"].startswith(f"annotated video {tmp_path} not written: ")
    assert [r["frame"] for r in records if "face" in r] == [0, 0, 4, 4, 8, 8]  # records go on
    assert summary.errors == 1


@pytest.mark.parametrize("argv", [
    ["--webcam", "--video", "clip.mp4"],
    ["--webcam", "-1"],
    ["--video", "a.mp4", "--video", "b.mp4", "--annotate-video", "a_out.mp4"],
    ["--video", "a.mp4", "--smoothing", "0"],
    ["--video", "a.mp4", "--annotate-video", "a.mp4"],
    ["--video", "a.mp4", "--video", "b.mp4", "--annotate-video", "o.mp4", "--annotate-video",
     "o.mp4"],
])
def test_cli_refuses_inconsistent_live_and_video_flags(argv, capsys):
    with pytest.raises(SystemExit):
        predict.main(argv)
    assert "error:" in capsys.readouterr().err
