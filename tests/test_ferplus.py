"""FER+: label modes on hand-computed vote rows, both source layouts, and bad-input errors."""

import csv
import os
import shutil
import subprocess
import sys
import tarfile
import types

import fixtures
import numpy as np
import pytest
from PIL import Image

from configs import default
from fermsca import datasets
from fermsca.datasets import ferplus, labels

ROWS = {"train": 22, "validation": 11, "test": 11}
ALL_SPLITS = ("train", "validation", "test")


def _config(manual_dir, data_dir, **fields):
    config = default.get_config().dataset
    config.update(dict(name="ferplus", manual_dir=str(manual_dir), data_dir=str(data_dir), **fields))
    return config


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
    # Names drift from the row numbers (blank rows among the images) and two names repeat, as in
    # Microsoft's fer2013new.csv; read by FERPlus's rules the csv holds the folders' images.
    (tmp_path / "raw").mkdir()
    blank, repeated = {"train": 2, "test": 1}, {"train": 1, "test": 1}
    fixtures.write_ferplus_csv(tmp_path / "raw", contents, dropped_rows=blank, repeated=repeated)
    from_csv = datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), ALL_SPLITS)
    from_folders = datasets.load(_config(folder_layout, folder_data_dir), ALL_SPLITS)
    for split in ALL_SPLITS:
        a, b = from_csv.splits[split], from_folders.splits[split]
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.file_names, b.file_names)
        assert a.counts.get("dropped_not_in_ferplus", 0) == blank.get(split, 0)
        assert a.counts.get("dropped_duplicate_name", 0) == repeated.get(split, 0)
        at_source = sum(a.counts.get(f"dropped_{rule}", 0) for rule in ferplus.SOURCE_DROP_RULES)
        assert a.counts["total"] == b.counts["total"] + at_source
        drops = sum(v for k, v in a.counts.items() if k.startswith("dropped_"))
        assert a.counts["total"] == a.counts["kept"] + drops
    built = ferplus.Ferplus(data_dir=str(tmp_path / "tfds"))
    assert ferplus.source_drops(built.info.metadata) == {
        "train": {"not_in_ferplus": 2, "duplicate_name": 1},
        "validation": {},
        "test": {"not_in_ferplus": 1, "duplicate_name": 1},
    }
    cached = datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), ALL_SPLITS)
    assert cached.splits["train"].counts == from_csv.splits["train"].counts  # kept in metadata


def test_kaggle_names_follow_fer2013new_not_the_row_number(tmp_path, contents):
    fixtures.write_ferplus_csv(tmp_path, contents, dropped_rows={"train": 3, "validation": 1})
    records = ferplus.read_kaggle(str(tmp_path / "fer2013.csv"), str(tmp_path / "fer2013new.csv"))
    names = [row[1] for row in csv.reader(open(tmp_path / "fer2013new.csv", newline=""))][1:]
    assert any(name and name != f"fer{index:07d}.png" for index, name in enumerate(names))  # drifted
    for split, rows in contents.items():
        assert records[split].names == [name for name, _, _ in rows]
        np.testing.assert_array_equal(records[split].votes, [votes for _, votes, _ in rows])
        np.testing.assert_array_equal(records[split].images, np.stack([image for _, _, image in rows]))
    assert {s: r.dropped for s, r in records.items()} == {
        "train": {"not_in_ferplus": 3},
        "validation": {"not_in_ferplus": 1},
        "test": {},
    }


def test_repeated_name_keeps_its_last_row_in_both_layouts(tmp_path, contents):
    # As fer0033120.png in the real PrivateTest rows: a later row reuses an earlier image's name
    # with other pixels and votes. The generator saves the later image over the earlier one, and
    # its label.csv lists both rows.
    rows = contents["train"][:5]
    later = (rows[1][0], [0] * 9 + [10], np.full((48, 48), 9, np.uint8))
    fixtures.write_ferplus_folders(tmp_path, {"train": rows + [later]}, with_box=False)
    fixtures.write_ferplus_csv(tmp_path, {"train": rows + [later]})
    from_folder = ferplus.read_folder(str(tmp_path / "FER2013Train"))
    from_csv = ferplus.read_kaggle(str(tmp_path / "fer2013.csv"), str(tmp_path / "fer2013new.csv"))["train"]
    kept = [rows[0], rows[2], rows[3], rows[4], later]
    for records in (from_folder, from_csv):
        assert records.names == [name for name, _, _ in kept]
        np.testing.assert_array_equal(records.votes, [votes for _, votes, _ in kept])
        np.testing.assert_array_equal(records.images, np.stack([image for _, _, image in kept]))
        assert records.dropped == {"duplicate_name": 1}


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


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "FER2013Train").mkdir()
    (tmp_path / "FER2013Train" / "label.csv").write_text("")
    cmd = [sys.executable, "-m", "fermsca.datasets.ferplus", f"--manual_dir={tmp_path}",
           f"--data_dir={tmp_path / 'tfds'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "FER2013Train" / "label.csv") in last


def test_count_table_reports_source_drops():
    votes = {"train": np.tile([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], (3, 1)), "validation": np.eye(10)[:2] * 10}
    table = ferplus.count_table(
        votes, {"train": {"not_in_ferplus": 2, "duplicate_name": 1}, "validation": {}}
    )
    assert "| kept | dropped not_in_ferplus | dropped duplicate_name | dropped no_votes |" in table
    assert "| train | majority | 6 | 3 | 2 | 1 | 0 |" in table
    assert "| validation | majority | 2 | 2 | 0 | 0 | 0 |" in table
    assert "not_in_ferplus" not in ferplus.count_table(votes)


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
    "empty name": (lambda line: line[line.index(",") :], r"row 3, field 'name'"),
    # One vote column short reads like the no-box layout; the file's other rows have the box.
    "one column missing": (
        lambda line: line.rsplit(",", 1)[0],
        r"row 3: expected 12 columns \(name, face box, 10 vote counts\) like the rest of the file, got 11",
    ),
    "face box not a box": (
        lambda line: line.replace('"(0, 0, 48, 48)"', "0"),
        r"row 3, field 'face box': '0' is not a box",
    ),
    "name in the validation folder": (
        lambda line: "../FER2013Valid/fer0028638.png" + line[line.index(",") :],
        r"row 3, field 'name': '\.\./FER2013Valid/fer0028638\.png' is not a plain file name",
    ),
    "name in a subfolder": (
        lambda line: "faces/fer0000002.png" + line[line.index(",") :],
        r"row 3, field 'name'.*not a plain file name",
    ),
    "absolute name": (
        lambda line: "/tmp/fer0000002.png" + line[line.index(",") :],
        r"row 3, field 'name'.*not a plain file name",
    ),
    "windows path": (
        lambda line: "..\\fer0000002.png" + line[line.index(",") :],
        r"row 3, field 'name'.*not a plain file name",
    ),
    "parent folder": (lambda line: ".." + line[line.index(",") :], r"row 3, field 'name'.*not a plain"),
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
        # Rows: 2 fer0000000.png, 3 a blank name, 4 fer0000001.png, 5 fer0000002.png.
        ("fer2013.csv", 4, 1, "1 2 3", r"fer2013\.csv, row 4, field 'pixels': 3 values"),
        ("fer2013.csv", 4, 1, "1 2 x", r"fer2013\.csv, row 4, field 'pixels'"),
        ("fer2013.csv", 4, 1, "1.5 " * 2304, r"fer2013\.csv, row 4, field 'pixels'"),
        ("fer2013.csv", 4, 1, "256 " * 2304, r"fer2013\.csv, row 4, field 'pixels': values outside"),
        ("fer2013.csv", 2, 2, "Validation", r"fer2013\.csv, row 2, field 'Usage'"),
        ("fer2013new.csv", 4, 1, "../x.png", r"fer2013new\.csv, row 4, field 'Image name'.*plain"),
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


def _write_label_rows(folder, rows):
    with open(os.path.join(folder, "label.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _label_rows(folder):
    return list(csv.reader(open(os.path.join(folder, "label.csv"), newline="")))


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_label_file_names_the_file(tmp_path, contents, text):
    fixtures.write_ferplus_folders(tmp_path / "raw", {"train": contents["train"][:2]})
    label_file = tmp_path / "raw" / "FER2013Train" / "label.csv"
    label_file.write_text(text)
    with pytest.raises(datasets.DataError, match="no rows") as error:  # not TFDS "No examples were yielded"
        datasets.load(_config(tmp_path / "raw", tmp_path / "tfds"), required=("train",))
    assert str(error.value).startswith(str(label_file))


def test_label_layout_is_the_files_not_the_first_rows(train_folder):
    rows = _label_rows(train_folder)
    _write_label_rows(train_folder, [rows[0][:-1]] + rows[1:])  # the first row lost its NF column
    with pytest.raises(datasets.DataError, match=r"row 1: expected 12 columns .* like the rest of the file"):
        ferplus.read_folder(train_folder)


def test_label_row_with_extra_column_in_no_box_file(train_folder):
    rows = [[row[0]] + row[2:] for row in _label_rows(train_folder)]  # the current generator's layout
    rows[2] = rows[2][:1] + ["(0, 0, 48, 48)"] + rows[2][1:]
    _write_label_rows(train_folder, rows)
    with pytest.raises(datasets.DataError, match=r"row 3: expected 11 columns \(name, 10 vote counts\)"):
        ferplus.read_folder(train_folder)


def test_label_file_of_neither_layout(train_folder):
    _write_label_rows(train_folder, [row + ["0"] for row in _label_rows(train_folder)])
    with pytest.raises(datasets.DataError, match=r"row 1: expected 12 columns .* or 11 .*got 13"):
        ferplus.read_folder(train_folder)


def test_byte_order_mark_is_read(tmp_path, train_folder, contents):
    label_file = os.path.join(train_folder, "label.csv")
    text = open(label_file, encoding="utf-8").read()
    open(label_file, "w", encoding="utf-8").write("\ufeff" + text)
    assert ferplus.read_folder(train_folder).names == [name for name, _, _ in contents["train"][:4]]
    fixtures.write_ferplus_csv(tmp_path, {"train": contents["train"][:3]})
    for name in ("fer2013.csv", "fer2013new.csv"):
        text = (tmp_path / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
    records = ferplus.read_kaggle(str(tmp_path / "fer2013.csv"), str(tmp_path / "fer2013new.csv"))
    assert records["train"].names == [name for name, _, _ in contents["train"][:3]]


def test_kaggle_split_with_only_blank_names(tmp_path, contents):
    fixtures.write_ferplus_csv(tmp_path, {"train": contents["train"][:3]}, dropped_rows={"test": 2})
    fer, new = str(tmp_path / "fer2013.csv"), str(tmp_path / "fer2013new.csv")
    with pytest.raises(datasets.DataError, match=r"fer2013new\.csv: every PrivateTest row has a blank"):
        ferplus.read_kaggle(fer, new)
    assert set(ferplus.read_kaggle(fer, new, splits={"train"})) == {"train"}


# ---------------------------------------------------------------------------------------------
# A fer2013.csv that does not belong to fer2013new.csv must fail: the row count, the Usage of
# every row and, with a split folder present, the pixels of a sample of rows give it away.


def _rewrite_rows(path, change):
    lines = open(path, newline="").read().splitlines()
    open(path, "w", newline="").write("\n".join(lines[:1] + change(lines[1:])) + "\n")


def _shuffled(rows, usage=None, seed=0):
    """The rows in another order; with `usage`, only those of that Usage, among themselves."""
    places = [i for i, row in enumerate(rows) if usage is None or row.endswith("," + usage)]
    order = np.random.default_rng(seed).permutation(places)
    out = list(rows)
    for place, source in zip(places, order, strict=True):
        out[place] = rows[source]
    return out


WRONG_FER2013 = {
    # 48 data rows: 44 images, 3 blank names, 1 repeated name.
    "truncated": (lambda rows: rows[:-5], r"fer2013new\.csv: 48 data rows, but .*fer2013\.csv has 43"),
    "cut inside a row": (
        lambda rows: rows[:-1] + [rows[-1][: len(rows[-1]) // 2]],
        r"fer2013\.csv, row 49: expected 3 columns, got 2",
    ),
    "another copy with other rows": (
        lambda rows: rows[:30] + rows[:10],
        r"fer2013new\.csv: 48 data rows, but .*fer2013\.csv has 40; the two files must be row-aligned",
    ),
    "shuffled": (_shuffled, r"fer2013new\.csv, row \d+, field 'Usage'.*must be row-aligned"),
}


@pytest.mark.parametrize("case", sorted(WRONG_FER2013))
def test_wrong_fer2013_fails(tmp_path, contents, case):
    change, message = WRONG_FER2013[case]
    fixtures.write_ferplus_csv(
        tmp_path, contents, dropped_rows={"train": 2, "test": 1}, repeated={"train": 1}
    )
    _rewrite_rows(tmp_path / "fer2013.csv", change)
    with pytest.raises(datasets.DataError, match=message):
        ferplus.read_sources(str(tmp_path))


def test_fer2013_from_another_source_by_header(tmp_path, contents):
    fixtures.write_ferplus_csv(tmp_path, contents)
    lines = (tmp_path / "fer2013.csv").read_text().splitlines()
    # Kaggle's icml_face_data.csv holds the same images with the columns in another order.
    rows = [line.split(",") for line in lines]
    lines = [",".join([row[0], " " + row[2], row[1]]) for row in rows]
    (tmp_path / "fer2013.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        datasets.DataError, match=r"fer2013\.csv, row 1: expected header emotion,pixels,Usage"
    ):
        ferplus.read_sources(str(tmp_path))


def test_pixels_are_checked_against_a_folder(tmp_path, contents):
    # Training rows in another order keep the Usage column: only the images can tell.
    fixtures.write_ferplus_csv(tmp_path, contents, dropped_rows={"train": 2}, repeated={"train": 1})
    fixtures.write_ferplus_folders(tmp_path, {"train": contents["train"]})
    records = ferplus.read_sources(str(tmp_path))  # aligned: train from the folder, the rest from the csv
    assert {s: r.source for s, r in records.items()}["train"] == str(tmp_path / "FER2013Train")
    assert records["test"].names == [name for name, _, _ in contents["test"]]
    _rewrite_rows(tmp_path / "fer2013.csv", lambda rows: _shuffled(rows, usage="Training"))
    with pytest.raises(datasets.DataError) as error:
        ferplus.read_sources(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'fer2013.csv'}, row ")
    assert str(tmp_path / "FER2013Train" / "fer00000") in message and "fer2013new.csv" in message
    assert "not row-aligned" in message


# ---------------------------------------------------------------------------------------------
# The real files: the shared FERPlus train / validation folders, Microsoft's fer2013new.csv and a
# Kaggle-layout fer2013.csv built from the two (placeholder pixels where no PNG exists: blank names
# and the PrivateTest rows).

REAL_NAMES = {"train": 28_558, "validation": 3_579, "test": 3_573}
REAL_SOURCE_DROPS = {
    "train": {"not_in_ferplus": 148, "duplicate_name": 3},
    "validation": {"not_in_ferplus": 10},
    "test": {"not_in_ferplus": 15, "duplicate_name": 1},
}
# The folders' label.csv is the one the FERPlus repository carried under data/: it holds an
# earlier set of votes than fer2013new.csv, different (still 10 votes) for this many images.
REAL_VOTES_DIFFER = {"train": 1_073, "validation": 246}
# Kept images per label mode (fermsca/datasets/README.md): from the folders' label.csv, and from
# fer2013new.csv (the Kaggle layout, or the label.csv the current generator writes).
REAL_KEPT = {
    "folder": {
        "train": {"majority": 25_045, "crossentropy": 27_947, "probability": 27_947, "multi_target": 27_667},
        "validation": {"majority": 3_191, "crossentropy": 3_508, "probability": 3_508, "multi_target": 3_472},
    },
    "csv": {
        "train": {"majority": 25_057, "crossentropy": 27_953, "probability": 27_953, "multi_target": 27_668},
        "validation": {"majority": 3_199, "crossentropy": 3_505, "probability": 3_505, "multi_target": 3_472},
    },
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not (fixtures.FERPLUS_ARCHIVE.is_file() and fixtures.FERPLUS_NEW_CSV.is_file()):
        pytest.skip(f"the real FER+ files are not in {fixtures.FERPLUS_ARCHIVE.parent}")
    root = tmp_path_factory.mktemp("ferplus_real")
    with tarfile.open(fixtures.FERPLUS_ARCHIVE) as archive:
        archive.extractall(root / "folders", filter="data")
    folders = {
        split: ferplus.read_folder(str(root / "folders" / ferplus.SPLIT_FOLDERS[split]))
        for split in ("train", "validation")
    }
    kaggle = root / "kaggle"
    kaggle.mkdir()
    shutil.copy(fixtures.FERPLUS_NEW_CSV, kaggle / "fer2013new.csv")
    images = {name: image for r in folders.values() for name, image in zip(r.names, r.images, strict=True)}
    fixtures.write_kaggle_fer2013(kaggle / "fer2013.csv", fixtures.FERPLUS_NEW_CSV, images)
    fixtures.write_ferplus_generator_labels(root / "generator", fixtures.FERPLUS_NEW_CSV)
    return types.SimpleNamespace(root=root, folders=folders, kaggle=kaggle)


def test_real_kaggle_csv_gives_the_folders_images(real):
    fer, new = str(real.kaggle / "fer2013.csv"), str(real.kaggle / "fer2013new.csv")
    # The pixel check against the folders runs too and passes on the real files.
    records = ferplus.read_kaggle(fer, new, splits={"train", "validation"}, compare_with=real.folders)
    assert set(records) == {"train", "validation"}
    for split, folder in real.folders.items():
        a = records[split]
        assert len(a.names) == len(set(a.names)) == len(folder.names) == REAL_NAMES[split]
        assert a.dropped == REAL_SOURCE_DROPS[split] and folder.dropped == {}
        order = np.argsort(a.names)  # the folders' label.csv is sorted by name
        assert [a.names[i] for i in order] == folder.names
        np.testing.assert_array_equal(a.images[order], folder.images)
        assert (a.votes[order] != folder.votes).any(axis=1).sum() == REAL_VOTES_DIFFER[split]
        # The label.csv the current generator writes from the same fer2013new.csv: the same names
        # and votes in the same order, once its repeated names keep their last row.
        rows, repeated = ferplus.read_label_csv(
            str(real.root / "generator" / ferplus.SPLIT_FOLDERS[split] / "label.csv")
        )
        assert [name for name, _, _ in rows] == a.names
        np.testing.assert_array_equal(np.stack([votes for _, votes, _ in rows]), a.votes)
        assert repeated == REAL_SOURCE_DROPS[split].get("duplicate_name", 0)
        for layout, votes in (("csv", a.votes), ("folder", folder.votes)):
            for mode, kept in REAL_KEPT[layout][split].items():
                assert labels.apply_label_mode(votes, mode)[2]["kept"] == kept, (layout, split, mode)


@pytest.mark.slow  # builds the real FER+ set from the csv layout (about 20 s)
def test_real_kaggle_csv_builds(real, tmp_path):
    data = datasets.load(_config(real.kaggle, tmp_path / "tfds"), required=ALL_SPLITS)
    for split in ("train", "validation"):
        part = data.splits[split]
        assert part.counts["kept"] == REAL_KEPT["csv"][split]["majority"]
        assert part.counts["dropped_not_in_ferplus"] == REAL_SOURCE_DROPS[split]["not_in_ferplus"]
        drops = sum(v for k, v in part.counts.items() if k.startswith("dropped_"))
        assert part.counts["total"] == part.counts["kept"] + drops
        assert set(part.file_names) <= set(real.folders[split].names)
    assert len(data.splits["test"].file_names) > 0  # placeholder pixels, real votes
    built = ferplus.Ferplus(data_dir=str(tmp_path / "tfds"))
    assert {s: built.info.splits[s].num_examples for s in ALL_SPLITS} == REAL_NAMES
    assert ferplus.source_drops(built.info.metadata) == REAL_SOURCE_DROPS
