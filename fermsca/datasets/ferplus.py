"""FER+ (FER2013 images relabelled by 10 taggers each) as a TFDS builder.

Barsoum et al. 2016, arXiv 1608.01041; labels from github.com/microsoft/FERPlus. The builder stores
the raw vote counts; label modes (`labels.py`) are applied by `load`, so one build serves every
mode. Run as a module to print the per-split, per-mode counts:

    python -m fermsca.datasets.ferplus --manual_dir /tmp/ferplus --data_dir /tmp/tfds
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from fermsca.datasets import labels
from fermsca.datasets._common import (
    IMAGE_SIZE,
    SPLITS,
    DataError,
    Dataset,
    Split,
    prepare,
    read_grayscale,
    read_split,
)

CLASS_NAMES = labels.EMOTIONS
SPLIT_FOLDERS = {"train": "FER2013Train", "validation": "FER2013Valid", "test": "FER2013Test"}
USAGE_SPLITS = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
LABEL_FILE = "label.csv"
FER_CSV = "fer2013.csv"
FERPLUS_CSV = "fer2013new.csv"
FER_HEADER = ("emotion", "pixels", "Usage")
FERPLUS_HEADER = ("Usage", "Image name") + labels.VOTE_NAMES
# Source rows left out before building, by rule: a blank FER+ image name (an image FER+ removed),
# and a row whose image name comes again later in its split (the later row wins).
SOURCE_DROP_RULES = ("not_in_ferplus", "duplicate_name")
# When a split folder and the csv files are both present, this many csv rows of that split (spread
# over it) are compared pixel for pixel with the folder's PNGs of the same names.
PIXEL_CHECK_ROWS = 32

_NUM_VOTES = len(labels.VOTE_NAMES)
_FACE_BOX = re.compile(r"\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)")

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
FER+ cannot be downloaded automatically. Put one of these layouts in the manual directory:

(a) The folders written by FERPlus `src/generate_training_data.py`
    (https://github.com/microsoft/FERPlus):
        {SPLIT_FOLDERS["train"]}/label.csv  {SPLIT_FOLDERS["train"]}/fer0000000.png ...
        {SPLIT_FOLDERS["validation"]}/label.csv  ...
        {SPLIT_FOLDERS["test"]}/label.csv   ...
    label.csv has no header; each row is
        name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF
    as the current script writes it, or has the face box "(x, y, w, h)" after the name, as in the
    label.csv files the FERPlus repository carried under data/. A name listed twice keeps its last
    row (the script saved that row's image last, over the earlier one). Images are 48x48 grayscale
    PNGs in the split folder itself. Only the folders present become splits.

(b) The Kaggle file {FER_CSV} (columns emotion,pixels,Usage; from the ICML 2013 "Challenges in
    Representation Learning" facial expression challenge) next to Microsoft's {FERPLUS_CSV}
    (columns Usage,Image name,<10 vote counts>), read as FERPlus's script reads them: row N of
    one file belongs to row N of the other (same number of rows, same Usage on every row), and the
    image takes the name written in its {FERPLUS_CSV} row; these names do not follow the row
    numbers. Usage Training / PublicTest / PrivateTest becomes train / validation / test. Rows with
    a blank image name were dropped by FER+ and are counted as `not_in_ferplus`; when a name comes
    twice in a split, its last row is kept (the image the script leaves in the file) and the
    earlier one is counted as `duplicate_name`.

A folder from (a) takes precedence over (b) for its split. When (b) provides other splits, a sample
of its rows for each folder's split must have the same pixels as the folder's PNGs of those names.
"""


@dataclasses.dataclass(frozen=True)
class SplitRecords:
    """The raw content of one split: file names [N], votes int32 [N, 10], images uint8 [N, 48, 48].

    `dropped`: source rows left out before building, {rule: rows} for the rules in SOURCE_DROP_RULES
    that dropped any.
    """

    names: list[str]
    votes: np.ndarray
    images: np.ndarray
    source: str
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def not_in_ferplus(self) -> int:
        return self.dropped.get("not_in_ferplus", 0)


def _nonzero(**counts: int) -> dict[str, int]:
    return {rule: n for rule, n in counts.items() if n}


def _parse_votes(fields: list[str], where: str) -> np.ndarray:
    votes = np.zeros(_NUM_VOTES, np.int32)
    for i, (name, text) in enumerate(zip(labels.VOTE_NAMES, fields, strict=True)):
        try:
            value = int(text.strip())
        except ValueError:
            raise DataError(f"{where}, field {name!r}: vote count {text!r} is not an integer") from None
        if value < 0:
            raise DataError(f"{where}, field {name!r}: vote count {value} is negative")
        votes[i] = value
    return votes


def _check_name(name: str, where: str, field: str) -> None:
    """An image name must be a plain file name: the image lies in the split folder itself."""
    if not name:
        raise DataError(f"{where}, field {field!r}: image name is empty")
    if name in (".", "..") or "/" in name or "\\" in name or os.path.splitdrive(name)[0]:
        raise DataError(
            f"{where}, field {field!r}: {name!r} is not a plain file name (no folders, no '..'); "
            "the image must lie in the split folder itself"
        )


def _read_text_rows(path: str) -> list[list[str]]:
    """All csv rows of `path`, read as UTF-8 with or without a byte order mark."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable csv file ({error})") from None


def read_label_csv(path: str) -> tuple[list[tuple[str, np.ndarray, int]], int]:
    """Rows (image name, votes [10], 1-based row number) of a FERPlus `label.csv`, validated, and
    how many rows were left out because their name comes again later in the file.

    The layout (with or without the face box column) is the one most rows of the file have; a row
    with another number of columns is an error. A repeated name keeps its last row, at that row's
    place: FERPlus's script writes a row per fer2013new.csv row and saves the image of the later
    one over the earlier.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file is missing")
    numbered = [(number, fields) for number, fields in enumerate(_read_text_rows(path), start=1) if fields]
    if not numbered:
        raise DataError(f"{path}: no rows; a label file lists one image per row")
    with_box, without_box = _NUM_VOTES + 2, _NUM_VOTES + 1
    layouts = {
        with_box: f"name, face box, {_NUM_VOTES} vote counts",
        without_box: f"name, {_NUM_VOTES} vote counts",
    }
    widths = collections.Counter(len(fields) for _, fields in numbered if len(fields) in layouts)
    width = widths.most_common(1)[0][0] if widths else None  # a tie goes to the layout seen first
    rows, place = [], {}
    for number, fields in numbered:
        where = f"{path}, row {number}"
        if width is None:
            raise DataError(
                f"{where}: expected {with_box} columns ({layouts[with_box]}) or {without_box} "
                f"({layouts[without_box]}), got {len(fields)}"
            )
        if len(fields) != width:
            raise DataError(
                f"{where}: expected {width} columns ({layouts[width]}) like the rest of the file, "
                f"got {len(fields)}"
            )
        name = fields[0].strip()
        _check_name(name, where, "name")
        if width == with_box and not _FACE_BOX.fullmatch(fields[1].strip()):
            raise DataError(f"{where}, field 'face box': {fields[1]!r} is not a box '(x, y, w, h)'")
        votes = _parse_votes(fields[width - _NUM_VOTES :], where)
        if name in place:
            rows[place[name]] = None
        place[name] = len(rows)
        rows.append((name, votes, number))
    kept = [row for row in rows if row is not None]
    return kept, len(rows) - len(kept)


def read_folder(folder: str) -> SplitRecords:
    """Reads one FERPlus split folder (label.csv + PNGs), checking every row and image.

    The face box column is ignored: the reference reader uses the whole 48x48 image too. Rows left
    out for a repeated name are counted as `duplicate_name`.
    """
    label_path = os.path.join(folder, LABEL_FILE)
    rows, repeated = read_label_csv(label_path)
    images = np.zeros((len(rows), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, (name, _, number) in enumerate(rows):
        try:
            images[i] = read_grayscale(os.path.join(folder, name))
        except DataError as error:
            raise DataError(f"{error} (listed in {label_path}, row {number})") from None
    votes = np.stack([v for _, v, _ in rows])
    return SplitRecords(
        [n for n, _, _ in rows], votes, images, source=folder, dropped=_nonzero(duplicate_name=repeated)
    )


def _read_csv_rows(path: str, header: tuple[str, ...]) -> list[list[str]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file is missing")
    rows = _read_text_rows(path)
    found = rows[0] if rows else None
    if found is None or tuple(x.strip() for x in found) != header:
        raise DataError(f"{path}, row 1: expected header {','.join(header)}, got {found}")
    for number, fields in enumerate(rows[1:], start=2):
        if len(fields) != len(header):
            raise DataError(f"{path}, row {number}: expected {len(header)} columns, got {len(fields)}")
    return rows[1:]


def _parse_pixels(text: str, where: str) -> np.ndarray:
    try:
        values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        raise DataError(f"{where}, field 'pixels': not a list of integers") from None
    if values.size != IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(
            f"{where}, field 'pixels': {values.size} values, expected {IMAGE_SIZE * IMAGE_SIZE} "
            f"(a {IMAGE_SIZE}x{IMAGE_SIZE} image)"
        )
    if values.min() < 0 or values.max() > 255:
        raise DataError(f"{where}, field 'pixels': values outside 0..255")
    return values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def read_kaggle(
    fer_path: str,
    ferplus_path: str,
    splits=None,
    compare_with: dict[str, SplitRecords] | None = None,
) -> dict[str, SplitRecords]:
    """Reads Kaggle `fer2013.csv` with Microsoft's `fer2013new.csv`, by split, as FERPlus's
    `generate_training_data.py` pairs them.

    Row N of one file is row N of the other: both must have the same number of rows and the same
    Usage on every row. Each image takes the name written in its `fer2013new.csv` row; those names
    drift from the row numbers, which is normal. A blank name (an image FER+ removed) skips the row
    (`not_in_ferplus`). A name that comes again later in its split keeps the later row, at that
    row's place: the script saves each row's image under its name, so the later image is the one
    left in the file; the earlier rows are counted as `duplicate_name`.

    `compare_with`: splits read from folders. For each, a sample of its csv rows whose names are in
    the folder must have the same pixels as the folder's PNGs, which catches a `fer2013.csv` whose
    rows are in another order but keep the Usage column.
    """
    fer_rows = _read_csv_rows(fer_path, FER_HEADER)
    plus_rows = _read_csv_rows(ferplus_path, FERPLUS_HEADER)
    if len(fer_rows) != len(plus_rows):
        raise DataError(
            f"{ferplus_path}: {len(plus_rows)} data rows, but {fer_path} has {len(fer_rows)}; "
            "the two files must be row-aligned"
        )
    kept: dict[str, dict[str, int]] = {}  # split -> {image name: row index}, in the order kept
    dropped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index, (fer_row, plus_row) in enumerate(zip(fer_rows, plus_rows, strict=True)):
        number = index + 2  # 1-based, after the header
        usage = fer_row[2].strip()
        if usage not in USAGE_SPLITS:
            raise DataError(
                f"{fer_path}, row {number}, field 'Usage': {usage!r} is not one of {sorted(USAGE_SPLITS)}"
            )
        if plus_row[0].strip() != usage:
            raise DataError(
                f"{ferplus_path}, row {number}, field 'Usage': {plus_row[0].strip()!r} differs "
                f"from {usage!r} in {fer_path}; the two files must be row-aligned"
            )
        split = USAGE_SPLITS[usage]
        names = kept.setdefault(split, {})
        name = plus_row[1].strip()
        if not name:
            dropped[split]["not_in_ferplus"] += 1
            continue
        _check_name(name, f"{ferplus_path}, row {number}", "Image name")
        if name in names:
            dropped[split]["duplicate_name"] += 1
            del names[name]  # re-inserted below, at the later row's place
        names[name] = index
    if compare_with:
        _compare_pixels(fer_path, ferplus_path, fer_rows, kept, compare_with)
    records = {}
    for split, names in kept.items():
        if splits is not None and split not in splits:
            continue
        if not names:
            raise DataError(
                f"{ferplus_path}: every {_usage_of(split)} row has a blank image name, so split "
                f"{split!r} has no image"
            )
        rows = list(names.values())
        records[split] = SplitRecords(
            list(names),
            np.stack([_parse_votes(plus_rows[i][2:], f"{ferplus_path}, row {i + 2}") for i in rows]),
            np.stack([_parse_pixels(fer_rows[i][1], f"{fer_path}, row {i + 2}") for i in rows]),
            source=f"{fer_path} + {ferplus_path}",
            dropped=_nonzero(**dropped[split]),
        )
    return records


def _compare_pixels(
    fer_path: str,
    ferplus_path: str,
    fer_rows: list[list[str]],
    kept: dict[str, dict[str, int]],
    folders: dict[str, SplitRecords],
) -> None:
    """Checks a sample of csv rows, spread over each split, against the folder PNGs they name."""
    for split, records in folders.items():
        place = {name: i for i, name in enumerate(records.names)}
        common = [name for name in kept.get(split, {}) if name in place]
        if not common:
            continue
        picks = np.unique(
            np.linspace(0, len(common) - 1, min(PIXEL_CHECK_ROWS, len(common))).round().astype(int)
        )
        for pick in picks:
            name = common[pick]
            index = kept[split][name]
            where = f"{fer_path}, row {index + 2}"
            if not np.array_equal(_parse_pixels(fer_rows[index][1], where), records.images[place[name]]):
                raise DataError(
                    f"{where}: the pixels differ from {os.path.join(records.source, name)}, the image "
                    f"{ferplus_path} names on that row; {fer_path} is not row-aligned with "
                    f"{ferplus_path} (rows in another order, or another copy of FER2013)"
                )


# What a build reads under manual_dir (for its source fingerprint), and which of it are label files.
SOURCE_ENTRIES = (*SPLIT_FOLDERS.values(), FER_CSV, FERPLUS_CSV)


def is_label_file(name: str) -> bool:
    return os.path.basename(name) in (LABEL_FILE, FERPLUS_CSV)


def find_sources(manual_dir: str) -> dict[str, str]:
    """Which layout provides each split in `manual_dir`: {split: 'folder' | 'csv'}."""
    sources = {}
    for split, folder in SPLIT_FOLDERS.items():
        if os.path.isdir(os.path.join(manual_dir, folder)):
            sources[split] = "folder"
    if len(sources) < len(SPLIT_FOLDERS) and all(
        os.path.isfile(os.path.join(manual_dir, f)) for f in (FER_CSV, FERPLUS_CSV)
    ):
        for split in _csv_splits(os.path.join(manual_dir, FERPLUS_CSV)):
            sources.setdefault(split, "csv")
    return sources


def _csv_splits(ferplus_path: str) -> set[str]:
    """The splits with rows in `fer2013new.csv` (its Usage column must match fer2013.csv's anyway)."""
    found = set()
    with open(ferplus_path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        for fields in reader:
            if len(fields) == len(FERPLUS_HEADER) and fields[0].strip() in USAGE_SPLITS:
                found.add(USAGE_SPLITS[fields[0].strip()])
                if len(found) == len(USAGE_SPLITS):
                    break
    return found


def missing_split_message(split: str, manual_dir: str | None) -> str:
    where = manual_dir or "the manual directory"
    return (
        f"FER+ split {split!r} is not available: add the folder "
        f"{os.path.join(where, SPLIT_FOLDERS[split])}/ (label.csv + 48x48 PNGs, as written by "
        f"FERPlus generate_training_data.py), or put {FER_CSV} (with {_usage_of(split)} rows) and "
        f"{FERPLUS_CSV} in {where}."
    )


def _usage_of(split: str) -> str:
    return next(usage for usage, s in USAGE_SPLITS.items() if s == split)


def read_sources(manual_dir: str) -> dict[str, SplitRecords]:
    """Reads and validates every split available in `manual_dir` (see MANUAL_DOWNLOAD_INSTRUCTIONS)."""
    sources = find_sources(manual_dir)
    folders = {
        split: read_folder(os.path.join(manual_dir, SPLIT_FOLDERS[split]))
        for split, kind in sources.items()
        if kind == "folder"
    }
    records = dict(folders)
    csv_splits = [s for s, kind in sources.items() if kind == "csv"]
    if csv_splits:
        records.update(
            read_kaggle(
                os.path.join(manual_dir, FER_CSV),
                os.path.join(manual_dir, FERPLUS_CSV),
                splits=set(csv_splits),
                compare_with=folders,
            )
        )
    if not records:
        raise DataError(
            f"{manual_dir}: no FER+ data found (no {'/, '.join(SPLIT_FOLDERS.values())}/ folder "
            f"and no {FER_CSV} + {FERPLUS_CSV}).\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return records


def source_drops(metadata) -> dict[str, dict[str, int]]:
    """{split: {rule: rows}}: the source rows a build left out (SOURCE_DROP_RULES), from its metadata."""
    return {
        split: {rule: int(rows) for rule, rows in drops.items() if rows}
        for split, drops in dict(metadata.get("source_drops") or {}).items()
    }


class Ferplus(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """FER+: 48x48 grayscale faces with 10 crowd vote counts each (8 emotions, unknown, NF)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Images, raw vote counts and source file names.",
        "1.1.0": "fer2013.csv read as FERPlus's generator reads it (names from fer2013new.csv, a "
        "repeated name keeps its last row); per-split source drops in metadata['source_drops'].",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "FER2013 faces relabelled by 10 crowd taggers each (FER+). `votes` holds the counts "
                f"for {', '.join(labels.VOTE_NAMES)}; label modes are applied at load time."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "votes": tfds.features.Tensor(shape=(_NUM_VOTES,), dtype=np.int32),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/microsoft/FERPlus",
            citation="""@inproceedings{BarsoumICMI2016,
  title={Training Deep Networks for Facial Expression Recognition with Crowd-Sourced Label
         Distribution},
  author={Barsoum, Emad and Zhang, Cha and Canton Ferrer, Cristian and Zhang, Zhengyou},
  booktitle={ACM International Conference on Multimodal Interaction (ICMI)},
  year={2016}
}""",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Everything is read and validated here, so a bad row fails before anything is written.
        records = read_sources(os.fspath(dl_manager.manual_dir))
        self.info.metadata["source_drops"] = {s: dict(r.dropped) for s, r in records.items()}
        # The blank-name count alone, as builds before 1.1.0 stored it (older loaders read this key).
        self.info.metadata["not_in_ferplus"] = {s: r.not_in_ferplus for s, r in records.items()}
        self.info.metadata["sources"] = {s: r.source for s, r in records.items()}
        return {split: self._generate_examples(r) for split, r in records.items()}

    def _generate_examples(self, records: SplitRecords) -> Iterator[tuple[str, dict]]:
        for name, votes, image in zip(records.names, records.votes, records.images, strict=True):
            yield name, {"image": image[..., None], "votes": votes, "file_name": name}


def build(manual_dir: str | None, data_dir: str | None, rebuild: bool = False) -> Ferplus:
    """The FER+ builder, built from `manual_dir` if needed (source-checked: `_common.prepare`)."""
    builder = Ferplus(data_dir=data_dir)
    prepare(builder, manual_dir, SOURCE_ENTRIES, rebuild, is_label_file)
    return builder


def load(config: ml_collections.ConfigDict, required: Sequence[str]) -> Dataset:
    """Builds FER+ if needed and reads its splits; `config.label_mode` sets the train targets.

    Validation and test are always scored against majority labels. A `required` split missing
    from the stored build but present in `config.manual_dir` rebuilds it; one missing from both is
    a DataError naming the folder or files to add.
    """
    labels.check_mode(config.label_mode)
    manual_dir = config.manual_dir
    builder = Ferplus(data_dir=config.data_dir)
    rebuild = bool(config.rebuild)
    if not rebuild and manual_dir and builder.is_prepared():
        missing = [s for s in required if s not in builder.info.splits]
        if any(s in find_sources(manual_dir) for s in missing):
            logging.info("FER+: rebuilding to add split(s) %s found in %s", missing, manual_dir)
            rebuild = True
    source = prepare(builder, manual_dir, SOURCE_ENTRIES, rebuild, is_label_file)
    for split in required:
        if split not in builder.info.splits:
            raise DataError(missing_split_message(split, manual_dir))
    at_source = source_drops(builder.info.metadata)  # {split: {rule: rows}} left out when built
    splits = {}
    for split in SPLITS:
        if split not in builder.info.splits:
            continue
        data = read_split(builder, split)
        mode = config.label_mode if split == "train" else "majority"
        keep, targets, counts = labels.apply_label_mode(data["votes"], mode)
        for rule, rows in at_source.get(split, {}).items():
            counts["total"] += rows
            counts[f"dropped_{rule}"] = rows
        splits[split] = Split(
            images=data["image"][keep],
            targets=targets,
            sample_labels=mode == "probability",
            counts=counts,
            file_names=data["file_name"][keep],
        )
    return Dataset("ferplus", CLASS_NAMES, splits, source)


def count_table(
    votes_by_split: dict[str, np.ndarray], dropped: dict[str, dict[str, int]] | None = None
) -> str:
    """A Markdown table of kept and dropped counts for every split and label mode.

    `dropped`: {split: {rule: rows}} left out at the source (`source_drops`); they count in the
    total, with a column per rule, shown when any split has such rows.
    """
    dropped = dropped or {}
    source_rules = [r for r in SOURCE_DROP_RULES if any(d.get(r) for d in dropped.values())]
    rules = labels.ALL_DROP_RULES
    header = ["split", "label mode", "total", "kept"] + [f"dropped {r}" for r in source_rules + list(rules)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, votes in votes_by_split.items():
        at_source = [dropped.get(split, {}).get(r, 0) for r in source_rules]
        for mode in labels.LABEL_MODES:
            _, _, counts = labels.apply_label_mode(votes, mode)
            cells = [split, mode, f"{counts['total'] + sum(at_source):,}", f"{counts['kept']:,}"]
            cells += [f"{n:,}" for n in at_source]
            cells += [f"{counts[f'dropped_{r}']:,}" if f"dropped_{r}" in counts else "-" for r in rules]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_table(votes_by_split: dict[str, np.ndarray], mode: str = "majority") -> str:
    """A Markdown table of kept images per class (argmax of the target) for one label mode."""
    header = ["split"] + list(labels.EMOTIONS)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, votes in votes_by_split.items():
        _, targets, _ = labels.apply_label_mode(votes, mode)
        per_class = np.bincount(targets.argmax(-1), minlength=labels.NUM_EMOTIONS)
        lines.append("| " + " | ".join([split] + [f"{int(c):,}" for c in per_class]) + " |")
    return "\n".join(lines)


def main(argv) -> int:
    """Builds FER+ if needed and prints the per-split, per-label-mode counts."""
    del argv
    from absl import flags

    from fermsca import cli

    values = flags.FLAGS

    def body() -> None:
        builder = build(values.manual_dir, values.data_dir, values.rebuild)
        votes = {}
        for split in SPLITS:
            if split in builder.info.splits:
                votes[split] = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["votes"]
        print(count_table(votes, source_drops(builder.info.metadata)))
        print()
        print("Images kept per class, majority mode:")
        print()
        print(class_table(votes))

    return cli.run(body, verbose=values.verbose)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("manual_dir", None, "Folder with the FER+ files.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS default).")
    flags.DEFINE_bool("rebuild", False, "Rebuild the stored set from --manual_dir (files changed).")
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error as well as its one line.")
    # The builder is registered by the package import; run the registered module's code.
    from fermsca.datasets import ferplus as _registered

    app.run(_registered.main)
