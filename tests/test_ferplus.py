"""FER+: label modes on hand-computed vote rows, both source layouts, and bad-input errors."""

import os
import subprocess
import sys

import fixtures
import ml_collections
import numpy as np
import pytest
from PIL import Image

from fermsca import datasets
from fermsca.datasets import ferplus, labels

ROWS = {"train": 22, "validation": 11, "test": 11}
ALL_SPLITS = ("train", "validation", "test")


def _config(manual_dir, data_dir, **fields):
    return ml_collections.ConfigDict(
        dict(name="ferplus", manual_dir=str(manual_dir), data_dir=str(data_dir), **fields)
    )


# ---------------------------------------------------------------------------------------------
# Label modes.


@pytest.mark.parametrize("mode", labels.LABEL_MODES)
@pytest.mark.parametrize("case", range(len(fixtures.VOTE_CASES)))
def test_target_from_votes_matches_hand_computed(case, mode):
    votes, expected = fixtures.VOTE_CASES[case]
    want = expected["crossentropy" if mode == "probability" else mode]
    target, rule = labels.target_from_votes(votes, mode)
    if isinstance(want, str):
        assert target is None and rule == want
    else:
        assert rule is None
        np.testing.assert_allclose(target, want, atol=1e-6)
        assert target.dtype == np.float32 and abs(target.sum() - 1) < 1e-6


@pytest.mark.parametrize("mode", labels.LABEL_MODES)
def test_drop_counts_add_up_to_total(mode):
    rng = np.random.default_rng(0)
    # Ten taggers each, like FER+, plus rows with fewer votes.
    votes = np.stack([rng.multinomial(10, rng.dirichlet(np.full(10, 0.4))) for _ in range(500)])
    votes[:20] = rng.integers(0, 2, (20, 10))
    keep, targets, counts = labels.apply_label_mode(votes, mode)
    drops = {k: v for k, v in counts.items() if k.startswith("dropped_")}
    assert set(drops) == {f"dropped_{r}" for r in labels.DROP_RULES[mode]}
    assert counts["total"] == len(votes) == counts["kept"] + sum(drops.values())
    assert counts["kept"] == keep.sum() == len(targets)
    np.testing.assert_allclose(targets.sum(-1), 1, atol=1e-5)
    if mode == "majority":
        assert set(np.unique(targets)) <= {0.0, 1.0}


def test_unknown_label_mode_is_rejected():
    with pytest.raises(ValueError, match="label mode"):
        labels.apply_label_mode(np.zeros((1, 10)), "soft")


# ---------------------------------------------------------------------------------------------
# Builder on both layouts.


@pytest.fixture(scope="module")
def contents():
    return fixtures.ferplus_contents(ROWS)


@pytest.fixture(scope="module")
def folder_layout(tmp_path_factory, contents):
    root = tmp_path_factory.mktemp("ferplus_folders")
    fixtures.write_ferplus_folders(root, {s: contents[s] for s in ("train", "validation")})
    # The test split as the current generate_training_data.py writes it: no face box column.
    fixtures.write_ferplus_folders(root, {"test": contents["test"]}, with_box=False)
    return root


@pytest.fixture(scope="module")
def folder_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds_folders")


@pytest.mark.parametrize("mode", labels.LABEL_MODES)
def test_folder_layout_every_label_mode(folder_layout, folder_data_dir, contents, mode):
    data = datasets.load(_config(folder_layout, folder_data_dir, label_mode=mode), ALL_SPLITS)
    assert data.name == "ferplus" and data.class_names == labels.EMOTIONS
    assert set(data.splits) == set(ALL_SPLITS)
    for split, rows in contents.items():
        part = data.splits[split]
        split_mode = mode if split == "train" else "majority"  # evaluation uses majority
        keep, targets, counts = labels.apply_label_mode([v for _, v, _ in rows], split_mode)
        assert part.counts == counts
        assert part.sample_labels == (split_mode == "probability")
        np.testing.assert_allclose(part.targets, targets)
        kept = [r for r, k in zip(rows, keep, strict=True) if k]
        assert list(part.file_names) == [name for name, _, _ in kept]
        assert part.images.shape == (len(kept), 48, 48, 1) and part.images.dtype == np.uint8
        np.testing.assert_array_equal(part.images[..., 0], np.stack([im for _, _, im in kept]))


def test_label_modes_keep_different_images(folder_layout, folder_data_dir):
    kept = {
        mode: set(
            datasets.load(_config(folder_layout, folder_data_dir, label_mode=mode)).splits["train"].file_names
        )
        for mode in ("majority", "crossentropy", "multi_target")
    }
    assert kept["majority"] != kept["crossentropy"] != kept["multi_target"]


def test_kaggle_csv_layout_matches_folders(tmp_path, folder_layout, folder_data_dir, contents):
    (tmp_path / "raw").mkdir()
    fixtures.write_ferplus_csv(tmp_path / "raw", contents, dropped_rows={"train": 2, "test": 1})
    from_csv = datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), ALL_SPLITS)
    from_folders = datasets.load(_config(folder_layout, folder_data_dir), ALL_SPLITS)
    for split in ALL_SPLITS:
        a, b = from_csv.splits[split], from_folders.splits[split]
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.file_names, b.file_names)
        skipped = {"train": 2, "test": 1}.get(split, 0)
        assert a.counts.get("dropped_not_in_ferplus", 0) == skipped
        assert a.counts["total"] == b.counts["total"] + skipped
        drops = sum(v for k, v in a.counts.items() if k.startswith("dropped_"))
        assert a.counts["total"] == a.counts["kept"] + drops
    cached = datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), ALL_SPLITS)
    assert cached.splits["train"].counts == from_csv.splits["train"].counts  # kept in metadata


def test_missing_split_names_the_folder_then_is_added(tmp_path, contents):
    fixtures.write_ferplus_folders(tmp_path / "raw", {s: contents[s] for s in ("train", "validation")})
    config = _config(tmp_path / "raw", tmp_path / "tfds")
    data = datasets.load(config)  # train + validation is enough by default
    assert set(data.splits) == {"train", "validation"}
    with pytest.raises(datasets.DataError, match="FER2013Test") as error:
        datasets.load(config, required=ALL_SPLITS)
    assert "fer2013.csv" in str(error.value)
    fixtures.write_ferplus_folders(tmp_path / "raw", {"test": contents["test"]})
    data = datasets.load(config, required=ALL_SPLITS)  # rebuilt with the new folder
    assert set(data.splits) == set(ALL_SPLITS)


def test_no_manual_data_is_a_data_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("nothing here")
    with pytest.raises(datasets.DataError, match="no FER\\+ data found"):
        datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"))


def test_bad_row_surfaces_from_load_with_file_and_row(tmp_path, contents):
    fixtures.write_ferplus_folders(tmp_path / "raw", {"train": contents["train"][:3]})
    label_file = tmp_path / "raw" / "FER2013Train" / "label.csv"
    lines = label_file.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",-2"
    label_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(datasets.DataError, match=r"label\.csv, row 2, field 'NF'.*negative"):
        datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), required=("train",))


def test_cli_prints_count_table(folder_layout, folder_data_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fermsca.datasets.ferplus",
            f"--manual_dir={folder_layout}",
            f"--data_dir={folder_data_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "| train | multi_target | 22 |" in result.stdout
    assert "| test | majority | 11 |" in result.stdout


# ---------------------------------------------------------------------------------------------
# Bad input, read directly (each message names the file and the row or field).


def _edit_row(folder, row, new_text):
    label_file = os.path.join(folder, "label.csv")
    lines = open(label_file).read().splitlines()
    lines[row - 1] = new_text(lines[row - 1])
    open(label_file, "w").write("\n".join(lines) + "\n")


@pytest.fixture
def train_folder(tmp_path, contents):
    fixtures.write_ferplus_folders(tmp_path, {"train": contents["train"][:4]})
    return os.path.join(tmp_path, "FER2013Train")


BAD_ROWS = {
    "wrong column count": (lambda line: line.rsplit(",", 2)[0], r"row 3: expected 12 columns"),
    "non-integer vote": (
        lambda line: line.replace(",0,0,", ",0,x,", 1),
        r"row 3, field '.*': vote count 'x'",
    ),
    "fractional vote": (lambda line: line[: line.rindex(",")] + ",2.5", r"row 3, field 'NF'"),
    "negative vote": (lambda line: line[: line.rindex(",")] + ",-1", r"row 3, field 'NF'.*negative"),
    "duplicate name": (
        lambda line: "fer0000000.png" + line[line.index(",") :],
        r"row 3: duplicate image name",
    ),
    "empty name": (lambda line: line[line.index(",") :], r"row 3, field 'name'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_label_row(train_folder, case):
    edit, message = BAD_ROWS[case]
    _edit_row(train_folder, 3, edit)
    with pytest.raises(datasets.DataError, match=message) as error:
        ferplus.read_folder(train_folder)
    assert os.path.join(train_folder, "label.csv") in str(error.value)


def _break_image(path, how):
    if how == "missing":
        os.remove(path)
    elif how == "unreadable":
        open(path, "wb").write(b"not a png")
    elif how == "wrong size":
        fixtures.write_png(path, np.zeros((40, 48), np.uint8))
    elif how == "16-bit":
        Image.fromarray(np.zeros((48, 48), np.uint16)).save(path)


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "missing"),
        ("unreadable", "cannot be read"),
        ("wrong size", "48x40, expected 48x48"),
        ("16-bit", "cannot be converted to 8-bit grayscale"),
    ],
)
def test_bad_image(train_folder, how, message):
    image = os.path.join(train_folder, "fer0000002.png")
    _break_image(image, how)
    with pytest.raises(datasets.DataError, match=message) as error:
        ferplus.read_folder(train_folder)
    assert str(error.value).startswith(image) and "row 3" in str(error.value)


def test_rgb_png_is_converted_to_grayscale(train_folder, contents):
    image = os.path.join(train_folder, "fer0000001.png")
    fixtures.write_png(image, contents["train"][1][2], mode="RGB")
    records = ferplus.read_folder(train_folder)
    np.testing.assert_array_equal(records.images[1], contents["train"][1][2])


@pytest.fixture
def kaggle_dir(tmp_path, contents):
    fixtures.write_ferplus_csv(tmp_path, {"train": contents["train"][:3]}, {"train": 1})
    return tmp_path


def _edit_csv(path, row, column, value):
    import csv

    rows = list(csv.reader(open(path, newline="")))
    rows[row - 1][column] = value
    csv.writer(open(path, "w", newline="")).writerows(rows)


@pytest.mark.parametrize(
    "file, row, column, value, message",
    [
        ("fer2013.csv", 3, 1, "1 2 3", r"fer2013\.csv, row 3, field 'pixels': 3 values"),
        ("fer2013.csv", 3, 1, "1 2 x", r"fer2013\.csv, row 3, field 'pixels'"),
        ("fer2013.csv", 2, 2, "Validation", r"fer2013\.csv, row 2, field 'Usage'"),
        ("fer2013new.csv", 3, 1, "fer0000009.png", r"fer2013new\.csv, row 3, field 'Image name'"),
        ("fer2013new.csv", 3, 0, "PublicTest", r"fer2013new\.csv, row 3, field 'Usage'"),
        ("fer2013new.csv", 4, 3, "many", r"fer2013new\.csv, row 4, field 'happiness'"),
        ("fer2013new.csv", 1, 1, "Name", r"fer2013new\.csv, row 1: expected header"),
    ],
)
def test_bad_kaggle_csv(kaggle_dir, file, row, column, value, message):
    _edit_csv(kaggle_dir / file, row, column, value)
    with pytest.raises(datasets.DataError, match=message):
        ferplus.read_kaggle(str(kaggle_dir / "fer2013.csv"), str(kaggle_dir / "fer2013new.csv"))


def test_kaggle_files_of_different_length(kaggle_dir):
    lines = (kaggle_dir / "fer2013new.csv").read_text().splitlines()
    (kaggle_dir / "fer2013new.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(datasets.DataError, match="row-aligned"):
        ferplus.read_kaggle(str(kaggle_dir / "fer2013.csv"), str(kaggle_dir / "fer2013new.csv"))


def test_kaggle_wrong_column_count(kaggle_dir):
    with open(kaggle_dir / "fer2013.csv", "a") as f:
        f.write("0,1 2 3\n")
    with pytest.raises(datasets.DataError, match=r"fer2013\.csv, row 6: expected 3 columns"):
        ferplus.read_kaggle(str(kaggle_dir / "fer2013.csv"), str(kaggle_dir / "fer2013new.csv"))


def test_folder_takes_precedence_over_csv(tmp_path, contents):
    fixtures.write_ferplus_csv(tmp_path, contents)
    fixtures.write_ferplus_folders(tmp_path, {"validation": contents["validation"]})
    assert ferplus.find_sources(str(tmp_path)) == {
        "validation": "folder",
        "train": "csv",
        "test": "csv",
    }
