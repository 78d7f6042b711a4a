"""Face detection on real FER+ faces, no faces in flat or noise images, and crop geometry."""

import os
import tarfile

import cv2
import haar_margin
import numpy as np
import pytest
from PIL import Image

from fermsca import faces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERPLUS_TARBALL = os.path.join(REPO, "..", "shared", "data", "ferplus-trainvalid.tar.gz")

PASTE_X, PASTE_Y, PASTE_SIDE = 150, 100, 192  # where each 48x48 face goes, upscaled 4x
CANVAS_SHAPE = (400, 480)


def read_ferplus_faces(count: int) -> list[np.ndarray]:
    """The first `count` 48x48 faces of the shared FER+ tarball (skips when it is absent)."""
    if not os.path.isfile(FERPLUS_TARBALL):
        pytest.skip(f"shared FER+ data not found at {os.path.normpath(FERPLUS_TARBALL)}")
    found = []
    with tarfile.open(FERPLUS_TARBALL, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".png"):
                data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                found.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE))
                if len(found) == count:
                    break
    return found


def on_canvas(face: np.ndarray) -> np.ndarray:
    """A face upscaled to 192x192 on a flat grey 480x400 canvas."""
    canvas = np.full(CANVAS_SHAPE, 128, np.uint8)
    up = cv2.resize(face, (PASTE_SIDE, PASTE_SIDE), interpolation=cv2.INTER_CUBIC)
    canvas[PASTE_Y:PASTE_Y + PASTE_SIDE, PASTE_X:PASTE_X + PASTE_SIDE] = up
    return canvas


def iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0, min(ax1, bx1) - max(a[0], b[0]))
    h = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def real_faces():
    return read_ferplus_faces(24)


def test_detects_most_real_faces_where_they_are(real_faces):
    pasted = (PASTE_X, PASTE_Y, PASTE_SIDE, PASTE_SIDE)
    hits = 0
    for face in real_faces:
        boxes = faces.detect_faces(on_canvas(face))
        assert len(boxes) <= 2
        if boxes and iou(boxes[0], pasted) > 0.4:
            hits += 1
    # The Haar cascade misses profile and occluded FER faces; most frontal ones are found.
    assert hits >= 0.6 * len(real_faces), f"{hits}/{len(real_faces)} faces found"


def test_detection_on_a_large_photo_maps_boxes_back(real_faces):
    clear = haar_margin.clear_faces(real_faces, lambda face, _: on_canvas(face), count=1, draws=1,
                                    where=(PASTE_X, PASTE_Y, PASTE_SIDE, PASTE_SIDE))
    assert clear, "no face of the sample is found with a clear margin"
    canvas = on_canvas(clear[0])
    small = faces.detect_faces(canvas)
    big = faces.detect_faces(cv2.resize(canvas, (480 * 6, 400 * 6),
                                        interpolation=cv2.INTER_LINEAR))
    assert small and big
    assert iou([v * 6 for v in small[0]], big[0]) > 0.7


def test_crop_of_the_pasted_box_gives_back_the_face(real_faces):
    for face in real_faces[:8]:
        crop = faces.crop_face(on_canvas(face), (PASTE_X, PASTE_Y, PASTE_SIDE, PASTE_SIDE))
        assert crop.shape == (48, 48) and crop.dtype == np.uint8
        corr = np.corrcoef(crop.ravel().astype(float), face.ravel().astype(float))[0, 1]
        assert corr > 0.98
        assert np.abs(crop.astype(int) - face.astype(int)).mean() < 6


@pytest.mark.parametrize("kind", ["flat", "dark", "noise", "gradient"])
def test_no_face_in_images_without_one(kind):
    rng = np.random.default_rng(0)
    image = {"flat": np.full((300, 400), 128, np.uint8),
             "dark": np.zeros((300, 400), np.uint8),
             "noise": rng.integers(0, 256, (300, 400), dtype=np.uint8),
             "gradient": np.tile(np.linspace(0, 255, 400).astype(np.uint8), (300, 1))}[kind]
    assert faces.detect_faces(image) == []


def test_crop_inside_the_image_is_the_exact_square():
    gray = np.random.default_rng(1).integers(0, 256, (100, 120), dtype=np.uint8)
    np.testing.assert_array_equal(faces.crop_face(gray, (10, 20, 48, 48)), gray[20:68, 10:58])
    # A non-square box becomes the square of its longer side around the same centre.
    np.testing.assert_array_equal(faces.crop_face(gray, (16, 20, 36, 48)), gray[20:68, 10:58])


def test_crop_margin_grows_the_square_on_every_side():
    assert faces.square_box((10, 20, 40, 40), margin=0.25) == (0, 10, 60, 60)
    gray = np.random.default_rng(2).integers(0, 256, (100, 120), dtype=np.uint8)
    np.testing.assert_array_equal(faces.crop_face(gray, (14, 26, 36, 36), margin=1 / 6, size=48),
                                  gray[20:68, 8:56])


def test_crop_beyond_the_edge_repeats_edge_pixels():
    columns = np.tile(np.arange(60, dtype=np.uint8), (60, 1))  # pixel value = column index
    crop = faces.crop_face(columns, (-10, 0, 48, 48))
    assert (crop[:, :10] == 0).all()
    np.testing.assert_array_equal(crop[:, 10:], np.tile(np.arange(38), (48, 1)))


def test_crop_resizes_large_faces_to_48():
    gray = np.full((500, 500), 7, np.uint8)
    gray[100:300, 100:300] = 200
    crop = faces.crop_face(gray, (100, 100, 200, 200))
    assert crop.shape == (48, 48)
    assert (crop == 200).all()


def test_crop_rejects_bad_boxes():
    gray = np.zeros((50, 50), np.uint8)
    with pytest.raises(ValueError, match="no area"):
        faces.crop_face(gray, (0, 0, 0, 10))
    with pytest.raises(ValueError, match="outside"):
        faces.crop_face(gray, (60, 0, 10, 10))
    with pytest.raises(ValueError, match="margin"):
        faces.crop_face(gray, (0, 0, 10, 10), margin=-0.1)


def test_center_crop_takes_the_middle_square():
    gray = np.random.default_rng(3).integers(0, 256, (60, 100), dtype=np.uint8)
    assert faces.center_box(gray.shape) == (20, 0, 60, 60)
    np.testing.assert_array_equal(faces.center_crop(gray, size=60), gray[:, 20:80])
    assert faces.center_crop(gray).shape == (48, 48)
    assert faces.center_box(gray.shape, fraction=0.5) == (35, 15, 30, 30)
    np.testing.assert_array_equal(faces.center_crop(gray, size=30, fraction=0.5),
                                  gray[15:45, 35:65])


def test_to_gray_matches_pillow_and_respects_channel_order():
    rgb = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(rgb).convert("L"), np.int32)
    assert np.abs(faces.to_gray(rgb).astype(np.int32) - reference).max() <= 1
    np.testing.assert_array_equal(faces.to_gray(rgb[:, :, ::-1], order="bgr"), faces.to_gray(rgb))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(faces.to_gray(rgba), faces.to_gray(rgb))
    np.testing.assert_array_equal(faces.to_gray(rgb[:, :, :1]), rgb[:, :, 0])
    with pytest.raises(ValueError):
        faces.to_gray(rgb.astype(np.float32))


def test_missing_cascade_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path) + os.sep)
    with pytest.raises(faces.FaceDetectorError, match="haarcascade_frontalface_default.xml"):
        faces.cascade_path()
