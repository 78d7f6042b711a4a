"""The benchmark helpers shared by fermsca.bench and the speed experiments."""

import json

import numpy as np

from fermsca import bench


def test_random_batch_is_deterministic_uint8_and_one_hot():
    images, targets = bench.random_batch(16, num_classes=7)
    again, _ = bench.random_batch(16, num_classes=7)
    assert images.shape == (16, 48, 48, 1) and images.dtype == np.uint8
    assert targets.shape == (16, 7) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets.sum(axis=1), 1.0)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, bench.random_batch(16, 7, seed=1)[0])


def test_write_json_creates_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "record.json"
    bench.write_json(str(path), {"images_per_second": 1.5})
    assert json.loads(path.read_text()) == {"images_per_second": 1.5}


def test_cpu_model_names_something():
    assert isinstance(bench.cpu_model(), str) and bench.cpu_model()
