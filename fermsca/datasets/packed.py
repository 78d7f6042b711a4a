"""A loaded dataset as one compressed file that reads back without TensorFlow or TFDS.

    python -m fermsca.datasets.packed --config configs/ferplus.py --output /data/ferplus.fpk \
        --config.dataset.manual_dir=/data/ferplus
    python -m fermsca.main --config configs/ferplus.py --workdir runs/x \
        --config.dataset.packed_file=/data/ferplus.fpk

`write` stores what `datasets.load` returned (every split's images, targets, file names and counts,
the class names and the source fingerprint), and `read` gives the same `Dataset` back, bit for bit.
With `config.dataset.packed_file` set, `datasets.load` reads the file instead of building the
dataset, so a machine without TensorFlow (a lent GPU machine) trains on exactly the examples this
machine's builders produced.

The images are stored losslessly and small, so the FER+ train and validation splits travel in about
50 MB: each pixel is replaced by its difference (mod 256) from the median edge detector's
prediction from its left, upper and upper-left neighbours (the predictor of LOCO-I / JPEG-LS), and
the whole file is an xz (LZMA) stream, which the Python standard library reads.

The file records the dataset fields that decide its content (`CONTENT_FIELDS`: name, FER+ label
mode, CK+ protocol and fold...). `read` refuses a file whose fields differ from the config's, and one
whose decoded images do not match their stored SHA-256, with a `DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
from typing import Any

import numpy as np

from fermsca.datasets._common import SPLITS, DataError, Dataset, Split

FORMAT = "fermsca-packed-dataset-1"
# The dataset fields whose values change which examples and targets a dataset holds. The others
# (data_dir, manual_dir, rebuild, packed_file) say where things are; train_subset is applied after
# reading, as after building.
CONTENT_FIELDS = ("name", "label_mode", "builder_config", "frames_per_sequence", "allow_center_crop",
                  "protocol", "num_folds", "fold", "split_seed")


def _median_prediction(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    """LOCO-I's median edge detector on int16 neighbours: min(a, b) where c >= max(a, b), max(a, b)
    where c <= min(a, b), a + b - c otherwise."""
    high, low = np.maximum(left, up), np.minimum(left, up)
    return np.where(up_left >= high, low, np.where(up_left <= low, high, left + up - up_left))


def encode_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 residuals of the same shape (pixel - prediction, mod 256);
    neighbours outside the image count as 0."""
    x = images.astype(np.int16)
    pad = np.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
    prediction = _median_prediction(pad[:, 1:, :-1], pad[:, :-1, 1:], pad[:, :-1, :-1])
    return ((x - prediction) % 256).astype(np.uint8)


def decode_images(residuals: np.ndarray) -> np.ndarray:
    """The inverse of `encode_images`: pixels in raster order, every image and channel at once."""
    n, h, w, c = residuals.shape
    r = np.ascontiguousarray(residuals.transpose(1, 2, 0, 3)).astype(np.int16)  # [H, W, N, C]
    out = np.zeros((h + 1, w + 1, n, c), np.int16)  # a zero row and column before the image
    for i in range(h):
        for j in range(w):
            prediction = _median_prediction(out[i + 1, j], out[i, j + 1], out[i, j])
            out[i + 1, j + 1] = (r[i, j] + prediction) % 256
    return np.ascontiguousarray(out[1:, 1:].transpose(2, 0, 1, 3)).astype(np.uint8)


def content_fields(config: Any) -> dict[str, Any]:
    """The `CONTENT_FIELDS` of a `dataset` config, as plain JSON values."""
    return {field: config[field] for field in CONTENT_FIELDS}


def _sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def write(dataset: Dataset, config: Any, path: str) -> int:
    """Writes `dataset` (loaded with the `dataset` config `config`) to `path`; returns its bytes."""
    arrays, splits = {}, {}
    for name, split in dataset.splits.items():
        arrays[f"{name}.residuals"] = encode_images(split.images)
        arrays[f"{name}.targets"] = split.targets.astype(np.float32)
        arrays[f"{name}.file_names"] = np.asarray(split.file_names, dtype=str)
        splits[name] = {"shape": list(split.images.shape), "sha256": _sha256(split.images),
                        "sample_labels": bool(split.sample_labels), "counts": split.counts}
    metadata = {"format": FORMAT, "dataset": content_fields(config), "name": dataset.name,
                "class_names": list(dataset.class_names), "source": dataset.source, "splits": splits}
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.array(json.dumps(metadata)), **arrays)
    data = lzma.compress(buffer.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)  # a crash never leaves a truncated file under the final name
    return len(data)


def read(path: str, config: Any) -> Dataset:
    """The `Dataset` stored in `path`, checked against the `dataset` config `config`."""
    try:
        with open(path, "rb") as f:
            payload = lzma.decompress(f.read())
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        metadata = json.loads(str(arrays.pop("metadata")))
    except FileNotFoundError as error:
        raise DataError(f"{path}: packed dataset file is missing") from error
    except (lzma.LZMAError, ValueError, OSError, KeyError, EOFError) as error:
        raise DataError(f"{path}: not a readable packed dataset ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}")
    missing = [k for k in ("dataset", "name", "class_names", "source", "splits") if k not in metadata]
    if missing:
        raise DataError(f"{path}: its metadata lacks {', '.join(missing)}")
    stored, wanted = metadata["dataset"], content_fields(config)
    differ = [f"config.dataset.{k}: file {stored.get(k)!r}, config {v!r}"
              for k, v in wanted.items() if stored.get(k) != v]
    if differ:
        raise DataError(f"{path}: packed for other dataset settings ({'; '.join(differ)}); "
                        "pack it again with this config")
    splits = {}
    for name, info in metadata["splits"].items():
        if name not in SPLITS:
            raise DataError(f"{path}: unknown split {name!r}")
        try:
            residuals = arrays[f"{name}.residuals"]
            targets, file_names = arrays[f"{name}.targets"], arrays[f"{name}.file_names"]
        except KeyError as error:
            raise DataError(f"{path}: split {name!r} lacks {error}") from error
        images = decode_images(residuals)
        if list(images.shape) != info["shape"] or _sha256(images) != info["sha256"] or \
                len(targets) != len(images) or len(file_names) != len(images):
            raise DataError(f"{path}: split {name!r} is corrupt (its images do not match their "
                            "recorded shape and SHA-256, or its arrays differ in length)")
        splits[name] = Split(images=images, targets=targets, sample_labels=info["sample_labels"],
                             counts=info["counts"], file_names=file_names)
    return Dataset(name=metadata["name"], class_names=tuple(metadata["class_names"]), splits=splits,
                   source=metadata["source"])


def main(argv: list[str]) -> int:
    from absl import flags

    from fermsca import cli, config_schema, datasets

    flag_values = flags.FLAGS

    def body() -> int:
        config = flag_values.config
        if config.dataset.packed_file:
            raise cli.ConfigError("config.dataset.packed_file is set: it names a file to read; "
                                  "pack from the raw files (manual_dir) instead")
        if config.dataset.train_subset:
            raise cli.ConfigError("config.dataset.train_subset: pack the whole split; the subset "
                                  "is taken when the file is read")
        config_schema.validate(config)
        dataset = datasets.load(config.dataset, required=tuple(flag_values.splits))
        size = write(dataset, config.dataset, flag_values.output)
        counts = ", ".join(f"{k} {len(v.images)}" for k, v in dataset.splits.items())
        print(f"{flag_values.output}: {dataset.name} ({counts}), {size / 2**20:.1f} MiB")
        return 0

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    return cli.run(body, verbose=flag_values.verbose)


if __name__ == "__main__":
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from fermsca import cli

    cli.config_package_on_path(cli.flag_value(sys.argv, "config"))

    config_flags.DEFINE_config_file("config", None, "Config file whose `dataset` is packed.",
                                    lock_config=True)
    flags.DEFINE_string("output", None, "The packed file to write.")
    flags.DEFINE_list("splits", ["train", "validation"], "Splits that must be present (all present "
                      "ones are packed).")
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error as well as its one line.")
    flags.mark_flags_as_required(["config", "output"])
    app.run(main)
