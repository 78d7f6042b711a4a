"""CK+: both layouts, face cropping, evaluation protocols and bad-input errors."""

import os

import fixtures
import haar_margin
import numpy as np
import pytest

from configs import default
from fermsca import datasets
from fermsca.datasets import ckplus

EMOTION_TEXT = "{:.7e}"  # "3.0000000e+00", as in the release


def _config(manual_dir, data_dir, **fields):
    """The default `dataset` config for CK+ in `manual_dir`, official layout unless given."""
    config = default.get_config().dataset
    config.update(dict(name="ckplus", builder_config="official", manual_dir=str(manual_dir),
                       data_dir=str(data_dir)))
    config.update(fields)
    return config


# ---------------------------------------------------------------------------------------------
# Protocols.


def _subjects(rng, num_subjects=23, max_images=12):
    return np.concatenate([[f"S{s:03d}"] * int(rng.integers(1, max_images)) for s in range(num_subjects)])


def test_kfold_is_subject_independent_and_deterministic():
    subjects = _subjects(np.random.default_rng(0))
    seen_test = []
    for fold in range(10):
        parts = ckplus.kfold_indices(subjects, num_folds=10, fold=fold, seed=3)
        all_indices = np.concatenate(list(parts.values()))
        assert sorted(all_indices) == list(range(len(subjects)))  # each image exactly once
        groups = {split: set(subjects[index]) for split, index in parts.items()}
        assert not groups["train"] & groups["test"]
        assert not groups["train"] & groups["validation"]
        assert not groups["validation"] & groups["test"]
        again = ckplus.kfold_indices(subjects, num_folds=10, fold=fold, seed=3)
        for split in parts:
            np.testing.assert_array_equal(parts[split], again[split])
        next_test = ckplus.kfold_indices(subjects, 10, (fold + 1) % 10, seed=3)["test"]
        np.testing.assert_array_equal(parts["validation"], next_test)
        seen_test.append(parts["test"])
    assert sorted(np.concatenate(seen_test)) == list(range(len(subjects)))  # folds partition


def test_subject_folds_are_balanced_and_seeded():
    subjects = _subjects(np.random.default_rng(1), num_subjects=40)
    folds = ckplus.subject_folds(subjects, 5, seed=0)
    sizes = np.bincount([folds[s] for s in subjects], minlength=5)
    assert sizes.max() - sizes.min() <= 11  # within one subject's images
    assert folds == ckplus.subject_folds(list(reversed(subjects)), 5, seed=0)  # order-free
    assert folds != ckplus.subject_folds(subjects, 5, seed=1)


def test_kfold_rejects_bad_arguments():
    subjects = ["S001", "S002", "S003"]
    with pytest.raises(ValueError, match="cannot fill"):
        ckplus.kfold_indices(subjects, num_folds=4)
    with pytest.raises(ValueError, match=">= 3"):
        ckplus.kfold_indices(subjects, num_folds=2)
    with pytest.raises(ValueError, match="fold must be"):
        ckplus.kfold_indices(subjects, num_folds=3, fold=3)


def test_random_kfold_deals_every_image_into_one_test_fold():
    parts = [ckplus.random_indices(103, num_folds=10, fold=k, seed=5) for k in range(10)]
    for k, part in enumerate(parts):
        assert sorted(np.concatenate(list(part.values()))) == list(range(103))
        assert {len(part["test"]), len(part["validation"])} <= {10, 11}
        np.testing.assert_array_equal(part["validation"], parts[(k + 1) % 10]["test"])
    tests = np.concatenate([p["test"] for p in parts])
    assert sorted(tests) == list(range(103))  # each image tested exactly once
    np.testing.assert_array_equal(parts[3]["test"], ckplus.random_indices(103, 10, 3, seed=5)["test"])
    assert not np.array_equal(parts[3]["test"], ckplus.random_indices(103, 10, 3, seed=6)["test"])
    assert not np.array_equal(parts[3]["test"], np.arange(30, 40))  # shuffled, not consecutive
    with pytest.raises(ValueError, match="fold must be"):
        ckplus.random_indices(103, 10, 10)
    with pytest.raises(ValueError, match="cannot fill"):
        ckplus.random_indices(5, 10, 0)


# ---------------------------------------------------------------------------------------------
# CK+48 layout.


@pytest.fixture(scope="module")
def ckplus48_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckplus48")
    rng = np.random.default_rng(0)
    entries = []
    for subject in range(12):
        for sequence in range(1, 3):
            label = ckplus.CLASS_NAMES[(subject + sequence) % len(ckplus.CLASS_NAMES)]
            for frame in range(8, 11):  # the last three frames of a sequence
                name = f"S{subject + 10:03d}_{sequence:03d}_{frame:08d}.png"
                entries.append((label, name, fixtures.noise_image(rng)))
    fixtures.write_ckplus48(root, entries)
    return root


def test_ckplus48_kfold(ckplus48_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds48")
    config = _config(ckplus48_dir, data_dir, builder_config="ckplus48", num_folds=4, fold=1)
    data = datasets.load(config)
    assert data.class_names == ckplus.CLASS_NAMES and set(data.splits) == {"train", "validation", "test"}
    assert sum(p.counts["total"] for p in data.splits.values()) == 12 * 2 * 3
    subjects = {s: {n.split("/")[-1][:4] for n in p.file_names} for s, p in data.splits.items()}
    assert not subjects["train"] & subjects["test"] and not subjects["validation"] & subjects["test"]
    for part in data.splits.values():
        assert part.images.shape[1:] == (48, 48, 1) and not part.sample_labels
        assert part.counts == {"total": len(part.images), "kept": len(part.images), "center_cropped": 0}
        for name, target in zip(part.file_names, part.targets, strict=True):
            assert ckplus.CLASS_NAMES[target.argmax()] == name.split("/")[-2]
    again = datasets.load(config)
    np.testing.assert_array_equal(again.splits["test"].file_names, data.splits["test"].file_names)

    last_only = datasets.load(
        _config(
            ckplus48_dir,
            data_dir,
            builder_config="ckplus48",
            frames_per_sequence=1,
            protocol="random",
            num_folds=4,
        )
    )
    names = np.concatenate([p.file_names for p in last_only.splits.values()])
    assert len(names) == 24 and all(n.endswith("00000010.png") for n in names)
    assert len(last_only.splits["test"].file_names) == len(last_only.splits["validation"].file_names) == 6

    every = datasets.load(_config(ckplus48_dir, data_dir, builder_config="ckplus48", protocol="all"),
                          required=("train",))
    assert set(every.splits) == {"train"}
    assert sorted(every.splits["train"].file_names) == sorted(np.concatenate(
        [p.file_names for p in data.splits.values()]))
    with pytest.raises(datasets.DataError, match="protocol 'all' puts every image in train, so there "
                       "is no validation split: nothing is held out"):
        datasets.load(_config(ckplus48_dir, data_dir, builder_config="ckplus48", protocol="all"))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda root: fixtures.write_png(
                root / "CK+48" / "neutral" / "S001_001_00000001.png", np.zeros((48, 48), np.uint8)
            ),
            "unknown CK\\+48 class folder",
        ),
        (
            lambda root: fixtures.write_png(
                root / "CK+48" / "anger" / "face.png", np.zeros((48, 48), np.uint8)
            ),
            "not of the form",
        ),
        (
            lambda root: fixtures.write_png(
                root / "CK+48" / "happy" / "S010_001_00000008.png", np.zeros((48, 48), np.uint8)
            ),
            "duplicate file name",
        ),
        (
            lambda root: fixtures.write_png(
                root / "CK+48" / "fear" / "S099_001_00000001.png", np.zeros((64, 48), np.uint8)
            ),
            "48x64, expected 48x48",
        ),
    ],
)
def test_ckplus48_bad_input(tmp_path, make, message):
    rng = np.random.default_rng(0)
    fixtures.write_ckplus48(tmp_path, [("anger", "S010_001_00000008.png", fixtures.noise_image(rng))])
    make(tmp_path)
    with pytest.raises(datasets.DataError, match=message):
        datasets.load(_config(tmp_path, tmp_path / "tfds", builder_config="ckplus48"))


# ---------------------------------------------------------------------------------------------
# Official layout with Haar face detection.


@pytest.fixture(scope="module")
def faces():
    candidates = fixtures.real_faces(120)
    if candidates is None:
        pytest.skip(f"needs real FER+ faces in {fixtures.FERPLUS_SOURCE} or {fixtures.FERPLUS_ARCHIVE}")
    # Only faces found with a clear margin (coarser and stricter searches, other noise draws), so
    # the detections below do not depend on the CPU's code path in OpenCV.
    found = haar_margin.clear_faces(
        candidates, lambda face, draw: fixtures.ck_frame(face, np.random.default_rng(100 + draw)),
        count=30, min_size=98, where=(200, 110, 240, 240))
    if len(found) < 30:
        pytest.skip("too few of the available faces are found by the Haar cascade")
    return found


def _sequences(faces, rng, num_subjects=6):
    """Per subject two labelled sequences (4 and 2 frames) and one unlabelled sequence."""
    sequences, k = [], 0
    for s in range(num_subjects):
        subject = f"S{100 + s:03d}"
        for sequence, count, code in (("001", 4, 1 + s % 7), ("002", 2, 1 + (s + 3) % 7), ("003", 2, None)):
            frames = [fixtures.ck_frame(faces[(k + i) % len(faces)], rng) for i in range(count)]
            k += count
            text = None if code is None else EMOTION_TEXT.format(float(code))
            sequences.append((subject, sequence, text, frames))
    return sequences


@pytest.fixture(scope="module")
def official(tmp_path_factory, faces):
    root = tmp_path_factory.mktemp("ckplus_official")
    expected = fixtures.write_ckplus_official(root, _sequences(faces, np.random.default_rng(1)))
    return root, expected


def test_official_layout(official, tmp_path_factory):
    root, expected = official
    data_dir = tmp_path_factory.mktemp("tfds_official")
    data = datasets.load(_config(root, data_dir, builder_config="official", num_folds=3), ("test",))
    names = sorted(np.concatenate([p.file_names for p in data.splits.values()]))
    assert names == sorted(path for path, _ in expected)
    for part in data.splits.values():
        assert part.counts["center_cropped"] == 0
        for name, target, image in zip(part.file_names, part.targets, part.images, strict=True):
            subject, sequence = name.split("/")[1:3]
            s = int(subject[1:]) - 100
            code = 1 + s % 7 if sequence == "001" else 1 + (s + 3) % 7
            assert target.argmax() == code - 1
            assert image.std() > 5  # a face crop, not the flat background
    subjects = {s: {n.split("/")[1] for n in p.file_names} for s, p in data.splits.items()}
    assert not subjects["train"] & subjects["test"]

    last = datasets.load(_config(root, data_dir, frames_per_sequence=1, protocol="random"))
    last_names = np.concatenate([p.file_names for p in last.splits.values()])
    assert sorted(last_names) == sorted(p for p, rank in expected if rank == 0)


def test_official_crop_is_the_detected_face(official):
    import cv2

    root, _ = official
    frames = ckplus.scan_official(str(root), 3)[:6]
    crops, centered = ckplus.crop_faces([f.path for f in frames])
    assert not centered.any()
    for frame, crop in zip(frames, crops, strict=True):
        gray = cv2.imread(frame.path, cv2.IMREAD_GRAYSCALE)
        x, y, w, h = ckplus.detect_face(gray)
        assert 200 < x + w / 2 < 440 and 110 < y + h / 2 < 350  # centred on the pasted face
        expected = cv2.resize(gray[y : y + h, x : x + w], (48, 48), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(crop, expected)


def test_more_frames_than_stored_builds_a_new_config(official, tmp_path):
    root, _ = official
    data = datasets.load(_config(root, tmp_path, frames_per_sequence=4, protocol="random"))
    total = sum(p.counts["total"] for p in data.splits.values())
    assert total == 6 * (4 + 2)  # all frames of the short sequences, last 4 of the long ones
    assert (tmp_path / "ckplus" / "official_last4").is_dir()


def test_no_face_is_an_error_listing_files_unless_center_crop(tmp_path, faces):
    rng = np.random.default_rng(2)
    sequences = _sequences(faces, rng, num_subjects=3)
    sequences.append(("S200", "001", "5.0000000e+00", [fixtures.ck_frame(None, rng)] * 4))
    expected = fixtures.write_ckplus_official(tmp_path / "raw", sequences)
    faceless = [p for p, _ in expected if p.startswith(os.path.join("cohn-kanade-images", "S200"))]
    assert len(faceless) == 3
    config = _config(tmp_path / "raw", tmp_path / "tfds", num_folds=3)
    with pytest.raises(datasets.DataError, match="no face found in 3 image") as error:
        datasets.load(config)
    for path in faceless:
        assert path in str(error.value)

    config.allow_center_crop = True
    data = datasets.load(config)
    assert sum(p.counts["center_cropped"] for p in data.splits.values()) == 3
    assert "center_cropped=" in datasets.describe(data)
    config.allow_center_crop = False  # the stored centre crops are refused without the flag
    with pytest.raises(datasets.DataError, match="centre crop") as error:
        datasets.load(config)
    assert faceless[0] in str(error.value)


def test_unknown_emotion_code(tmp_path):
    rng = np.random.default_rng(0)
    fixtures.write_ckplus_official(tmp_path, [("S001", "001", "9.0000000e+00", [fixtures.noise_image(rng)])])
    with pytest.raises(datasets.DataError, match="unknown emotion code") as error:
        ckplus.scan_official(str(tmp_path), 3)
    assert os.path.join("Emotion", "S001", "001", "S001_001_00000001_emotion.txt") in str(error.value)


def test_labelled_sequence_without_frames(tmp_path):
    fixtures.write_ckplus_official(tmp_path, [("S001", "002", "3.0000000e+00", [])])
    os.makedirs(tmp_path / "cohn-kanade-images", exist_ok=True)
    with pytest.raises(datasets.DataError, match="labelled sequence has no frames") as error:
        ckplus.scan_official(str(tmp_path), 3)
    assert "S001_002_00000001_emotion.txt" in str(error.value)


def test_missing_release_folder(tmp_path):
    (tmp_path / "Emotion").mkdir()
    with pytest.raises(datasets.DataError, match="cohn-kanade-images"):
        ckplus.scan_official(str(tmp_path), 3)
