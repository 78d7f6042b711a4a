"""`fermsca.datasets.load` / `describe`: the API the trainer uses, on the built-in dataset."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from fermsca import datasets
from fermsca.datasets import synthetic_faces


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    config = ml_collections.ConfigDict()
    config.name = "synthetic_faces"
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.manual_dir = ml_collections.config_dict.placeholder(str)
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
        datasets.load(ml_collections.ConfigDict({"name": "affectnet"}))
    with pytest.raises(ValueError, match="unknown split"):
        datasets.load(ml_collections.ConfigDict({"name": "synthetic_faces"}), required=("dev",))


def test_missing_manual_dir_is_a_data_error(tmp_path):
    config = ml_collections.ConfigDict({"name": "ferplus", "data_dir": str(tmp_path)})
    with pytest.raises(datasets.DataError, match="Manual directory .* does not exist"):
        datasets.load(config)
    assert issubclass(datasets.DataError, ValueError)
