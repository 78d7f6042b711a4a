"""`fermsca.datasets.load` / `describe`: the API the trainer uses, on the built-in dataset."""

import dataclasses

import numpy as np
import pytest

from configs import default
from fermsca import datasets
from fermsca.datasets import synthetic_faces


def _dataset_config(**fields):
    """The default config's `dataset` fields, some replaced."""
    config = default.get_config().dataset
    config.update(fields)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def synthetic(data_dir):
    config = _dataset_config(name="synthetic_faces", data_dir=data_dir)
    return datasets.load(config, required=("train", "validation", "test"))


def test_load_synthetic_faces(synthetic):
    assert synthetic.name == "synthetic_faces"
    assert synthetic.class_names == datasets.CLASS_NAMES["synthetic_faces"]
    assert synthetic.num_classes == 8
    sizes = {"train": 4000, "validation": 800, "test": 800}
    assert set(synthetic.splits) == set(sizes)
    for split, size in sizes.items():
        part = synthetic.splits[split]
        assert part.images.shape == (size, 48, 48, 1) and part.images.dtype == np.uint8
        assert part.targets.shape == (size, 8) and part.targets.dtype == np.float32
        np.testing.assert_array_equal(part.targets.sum(1), 1)
        assert np.bincount(part.targets.argmax(1)).tolist() == [size // 8] * 8
        assert part.counts == {"total": size, "kept": size}
        assert not part.sample_labels
        assert len(set(part.file_names)) == size and part.file_names[0].startswith(f"{split}/")


def test_stored_split_matches_the_generator(synthetic):
    images, labels = synthetic_faces.generate(100, synthetic_faces.SPLIT_SEEDS["test"])
    np.testing.assert_array_equal(synthetic.splits["test"].images, images)
    np.testing.assert_array_equal(synthetic.splits["test"].targets.argmax(1), labels)


def test_describe(synthetic):
    text = datasets.describe(synthetic)
    assert text.splitlines()[0].startswith("synthetic_faces: 8 classes (neutral, happiness")
    assert "  train: 4000 of 4000 kept" in text and "  test: 800 of 800 kept" in text


def test_train_subset_keeps_the_first_training_examples(synthetic, data_dir):
    subset = datasets.load(_dataset_config(name="synthetic_faces", data_dir=data_dir, train_subset=100))
    train, full = subset.splits["train"], synthetic.splits["train"]
    np.testing.assert_array_equal(train.images, full.images[:100])
    np.testing.assert_array_equal(train.targets, full.targets[:100])
    np.testing.assert_array_equal(train.file_names, full.file_names[:100])
    assert train.counts == {"total": 4000, "kept": 4000, "train_subset": 100}
    assert subset.splits["validation"].counts == {"total": 800, "kept": 800}  # only train is cut
    assert "train_subset=100" in datasets.describe(subset)


def test_splits_are_frozen(synthetic):
    with pytest.raises(dataclasses.FrozenInstanceError):
        synthetic.splits["train"].sample_labels = True


def test_class_names_per_dataset():
    assert datasets.CLASS_NAMES["ferplus"][:3] == ("neutral", "happiness", "surprise")
    assert datasets.CLASS_NAMES["ckplus"] == (
        "anger",
        "contempt",
        "disgust",
        "fear",
        "happy",
        "sadness",
        "surprise",
    )


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load(_dataset_config(name="affectnet"))
    with pytest.raises(ValueError, match="unknown split"):
        datasets.load(_dataset_config(name="synthetic_faces"), required=("dev",))


def test_missing_manual_dir_is_a_data_error(tmp_path):
    config = _dataset_config(name="ferplus", data_dir=str(tmp_path))
    with pytest.raises(datasets.DataError, match="Manual directory .* does not exist"):
        datasets.load(config)
    assert issubclass(datasets.DataError, ValueError)


# ---------------------------------------------------------------------------------------------
# A stored build is used only for the raw files it was made from.


def _ckplus48_raw(root, rng, subjects=4):
    import fixtures

    from fermsca.datasets import ckplus

    entries = [(ckplus.CLASS_NAMES[s % 7], f"S{s + 10:03d}_001_{f:08d}.png", fixtures.noise_image(rng))
               for s in range(subjects) for f in range(8, 11)]
    fixtures.write_ckplus48(root, entries)
    return entries


def _ck_config(manual_dir, data_dir, **fields):
    return _dataset_config(name="ckplus", builder_config="ckplus48", protocol="random",
                           num_folds=4, manual_dir=manual_dir and str(manual_dir),
                           data_dir=str(data_dir), **fields)


def test_changed_raw_files_are_refused_until_rebuilt(tmp_path):
    import os
    import shutil

    raw, data_dir = tmp_path / "raw", tmp_path / "tfds"
    entries = _ckplus48_raw(raw, np.random.default_rng(0))
    first = datasets.load(_ck_config(raw, data_dir))
    assert first.source["manual_dir"] == str(raw) and first.source["files"] == len(entries)
    assert datasets.load(_ck_config(raw, data_dir)).source == first.source  # unchanged: reused

    label, name, _ = entries[0]  # relabel one image: move it to another class folder
    shutil.move(raw / "CK+48" / label / name, raw / "CK+48" / "fear" / name)
    with pytest.raises(datasets.DataError, match="rebuild=True") as error:
        datasets.load(_ck_config(raw, data_dir))
    assert first.source["digest"][:12] in str(error.value) and str(raw) in str(error.value)
    rebuilt = datasets.load(_ck_config(raw, data_dir, rebuild=True))
    assert rebuilt.source["digest"] != first.source["digest"]
    names = np.concatenate([p.file_names for p in rebuilt.splits.values()])
    targets = np.concatenate([p.targets for p in rebuilt.splits.values()])
    moved = targets[list(names).index(os.path.join("CK+48", "fear", name))]
    assert rebuilt.class_names[moved.argmax()] == "fear"

    with pytest.raises(datasets.DataError, match="manual_dir is not a folder"):
        datasets.load(_ck_config(tmp_path / "nonexistent", data_dir))
    other = tmp_path / "other"  # another folder, other files
    _ckplus48_raw(other, np.random.default_rng(1))
    with pytest.raises(datasets.DataError, match=f"made from {raw}"):
        datasets.load(_ck_config(other, data_dir))
    # No manual_dir: the stored build, and the results can say what it was made from.
    assert datasets.load(_ck_config(None, data_dir)).source == rebuilt.source


def test_a_changed_label_file_changes_the_fingerprint(tmp_path):
    from fermsca.datasets._common import source_fingerprint

    (tmp_path / "FER2013Train").mkdir()
    label = tmp_path / "FER2013Train" / "label.csv"
    label.write_text("fer0000000.png,4,3,0,0,0,0,0,0,0,3\n")
    from fermsca.datasets import ferplus

    is_label = ferplus.is_label_file
    before = source_fingerprint(str(tmp_path), ["FER2013Train", "fer2013.csv"], is_label)
    label.write_text("fer0000000.png,3,4,0,0,0,0,0,0,0,3\n")  # same size, other votes
    after = source_fingerprint(str(tmp_path), ["FER2013Train", "fer2013.csv"], is_label)
    assert (before["files"], before["bytes"]) == (after["files"], after["bytes"]) == (1, 35)
    assert before["digest"] != after["digest"]
    (tmp_path / "unrelated.txt").write_text("notes")  # outside the entries: not part of the build
    assert source_fingerprint(str(tmp_path), ["FER2013Train", "fer2013.csv"], is_label) == after
