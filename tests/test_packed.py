"""`fermsca.datasets.packed`: lossless image coding, the file's round trip and its refusals, and a
training run that reads one with TensorFlow and TFDS unimportable."""

import io
import json
import lzma
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from fermsca import datasets
from fermsca.datasets import DataError, Dataset, Split, labels, packed

REPO = pathlib.Path(__file__).resolve().parents[1]


def _med_reference(image: np.ndarray) -> np.ndarray:
    """Residuals of one [H, W] image, pixel by pixel as LOCO-I states the predictor."""
    h, w = image.shape
    out = np.zeros((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            a = int(image[i, j - 1]) if j else 0
            b = int(image[i - 1, j]) if i else 0
            c = int(image[i - 1, j - 1]) if i and j else 0
            if c >= max(a, b):
                prediction = min(a, b)
            elif c <= min(a, b):
                prediction = max(a, b)
            else:
                prediction = a + b - c
            out[i, j] = (int(image[i, j]) - prediction) % 256
    return out


def test_encode_matches_the_median_edge_detector_pixel_by_pixel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 6, 7, 2), dtype=np.uint8)
    images[0, :, :, 0] = np.arange(42, dtype=np.uint8).reshape(6, 7) * 6  # smooth ramps
    residuals = packed.encode_images(images)
    for n in range(3):
        for ch in range(2):
            np.testing.assert_array_equal(residuals[n, :, :, ch], _med_reference(images[n, :, :, ch]))


@pytest.mark.parametrize("shape", [(4, 48, 48, 1), (2, 5, 9, 3), (1, 1, 1, 1)])
def test_decode_inverts_encode(shape):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[0] = 255  # extremes: the residual wraps around
    if shape[0] > 1:
        images[1] = 0
    np.testing.assert_array_equal(packed.decode_images(packed.encode_images(images)), images)


def _dataset() -> Dataset:
    rng = np.random.default_rng(2)

    def split(n, sample):
        targets = rng.dirichlet(np.ones(8), n).astype(np.float32)
        return Split(images=rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8), targets=targets,
                     sample_labels=sample, counts={"total": n + 2, "kept": n, "dropped_nf": 2},
                     file_names=np.array([f"fer{i:07d}.png" for i in range(n)]))

    return Dataset(name="synthetic_faces", class_names=labels.EMOTIONS,
                   splits={"train": split(24, True), "validation": split(10, False)},
                   source={"files": 3, "sha256": "ab" * 32})


def _config(**fields):
    config = default.get_config().dataset
    config.update(fields)
    return config


@pytest.fixture
def packed_file(tmp_path):
    path = str(tmp_path / "data.fpk")
    packed.write(_dataset(), _config(), path)
    return path


def test_read_gives_back_what_was_written(packed_file):
    original, back = _dataset(), packed.read(packed_file, _config())
    assert (back.name, back.class_names, back.source) == (original.name, original.class_names,
                                                          original.source)
    assert set(back.splits) == {"train", "validation"}
    for name, split in original.splits.items():
        got = back.splits[name]
        np.testing.assert_array_equal(got.images, split.images)
        assert got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.targets, split.targets)
        np.testing.assert_array_equal(got.file_names, split.file_names)
        assert (got.sample_labels, got.counts) == (split.sample_labels, split.counts)
    assert not os.path.exists(packed_file + ".partial")


def test_load_reads_the_packed_file_and_takes_the_train_subset(packed_file):
    data = datasets.load(_config(packed_file=packed_file, train_subset=5))
    assert len(data.splits["train"].images) == 5 and data.splits["train"].counts["train_subset"] == 5
    with pytest.raises(DataError, match=r"data.fpk: no test split \(it holds train/validation\)"):
        datasets.load(_config(packed_file=packed_file), required=("train", "test"))


def test_refuses_a_file_packed_for_other_settings(packed_file):
    with pytest.raises(DataError, match=r"data.fpk: packed for other dataset settings \(config\.dataset\."
                                        r"label_mode: file 'majority', config 'probability'\)"):
        packed.read(packed_file, _config(label_mode="probability"))
    with pytest.raises(DataError, match="config.dataset.name: file 'synthetic_faces', config 'ferplus'"):
        packed.read(packed_file, _config(name="ferplus"))


def test_refuses_missing_truncated_and_altered_files(packed_file, tmp_path):
    with pytest.raises(DataError, match="nothing.fpk: packed dataset file is missing"):
        packed.read(str(tmp_path / "nothing.fpk"), _config())
    data = pathlib.Path(packed_file).read_bytes()
    truncated = tmp_path / "truncated.fpk"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.fpk: not a readable packed dataset"):
        packed.read(str(truncated), _config())
    # Well-formed files whose pixels changed after their SHA-256 was recorded, or whose metadata is off.
    with np.load(io.BytesIO(lzma.decompress(data))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    metadata = json.loads(str(arrays.pop("metadata")))

    def rewritten(name, metadata, arrays):
        buffer = io.BytesIO()
        np.savez(buffer, metadata=np.array(json.dumps(metadata)), **arrays)
        path = tmp_path / name
        path.write_bytes(lzma.compress(buffer.getvalue()))
        return str(path)

    altered_arrays = {**arrays, "validation.residuals": arrays["validation.residuals"].copy()}
    altered_arrays["validation.residuals"][3, 10, 10, 0] ^= 1
    with pytest.raises(DataError, match="altered.fpk: split 'validation' is corrupt"):
        packed.read(rewritten("altered.fpk", metadata, altered_arrays), _config())
    with pytest.raises(DataError, match="other.fpk: format 'something-else'"):
        packed.read(rewritten("other.fpk", {**metadata, "format": "something-else"}, arrays), _config())
    without_splits = {k: v for k, v in metadata.items() if k != "splits"}
    with pytest.raises(DataError, match="lacking.fpk: its metadata lacks splits"):
        packed.read(rewritten("lacking.fpk", without_splits, arrays), _config())


# Trains from a packed file in a fresh interpreter where TensorFlow and TFDS cannot be imported (as on
# a lent GPU machine), with the training split on the device.
_WITHOUT_TF = """
import runpy, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
sys.argv = ["fermsca.main", *sys.argv[1:]]
runpy.run_module("fermsca.main", run_name="__main__")
"""


@pytest.mark.slow
def test_packing_cli_then_training_without_tensorflow(tmp_path):
    path = tmp_path / "synthetic.fpk"
    env = {**os.environ, "FERMSCA_HUGEPAGES": "0"}
    done = subprocess.run([sys.executable, "-m", "fermsca.datasets.packed", "--config",
                           "configs/default.py", "--output", str(path),
                           f"--config.dataset.data_dir={tmp_path / 'tfds'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith(
        f"{path}: synthetic_faces (train 4000, validation 800, test 800), ")
    tiny = ["--config", "configs/default.py", "--config.model.stem_width=8",
            "--config.model.widths=8,16,16", "--config.max_steps=3", "--compilation_cache=off",
            f"--config.dataset.packed_file={path}"]
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TF, *tiny, "--workdir", str(tmp_path / "run"),
                          "--config.data_on_device=on"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["train_data_on_device"]
    assert results["versions"]["tensorflow_datasets"] not in ("", None)
    # Without the split on the device the tf.data pipeline would be needed: one line says so.
    host = subprocess.run([sys.executable, "-c", _WITHOUT_TF, *tiny, "--workdir", str(tmp_path / "host")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert host.returncode == 2
    assert host.stderr.strip().splitlines()[-1].startswith(
        "error: TensorFlow is not installed: without it, training reads a packed dataset")
