"""FER+ (FER2013 images relabelled by 10 taggers each) as a TFDS builder.

Barsoum et al. 2016, arXiv 1608.01041; labels from github.com/microsoft/FERPlus. The builder stores
the raw vote counts; label modes (`labels.py`) are applied when the data is loaded, so one build
serves every mode. Run as a module to print the per-split, per-mode counts:

    python -m fermsca.datasets.ferplus --manual_dir /tmp/ferplus --data_dir /tmp/tfds
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from fermsca.datasets import labels
from fermsca.datasets._common import IMAGE_SIZE, DataError, read_grayscale

SPLIT_FOLDERS = {"train": "FER2013Train", "validation": "FER2013Valid", "test": "FER2013Test"}
USAGE_SPLITS = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
LABEL_FILE = "label.csv"
FER_CSV = "fer2013.csv"
FERPLUS_CSV = "fer2013new.csv"
FER_HEADER = ("emotion", "pixels", "Usage")
FERPLUS_HEADER = ("Usage", "Image name") + labels.VOTE_NAMES

_NUM_VOTES = len(labels.VOTE_NAMES)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
FER+ cannot be downloaded automatically. Put one of these layouts in the manual directory:

(a) The folders written by FERPlus `src/generate_training_data.py`
    (https://github.com/microsoft/FERPlus):
        {SPLIT_FOLDERS["train"]}/label.csv  {SPLIT_FOLDERS["train"]}/fer0000000.png ...
        {SPLIT_FOLDERS["validation"]}/label.csv  ...
        {SPLIT_FOLDERS["test"]}/label.csv   ...
    label.csv has no header; each row is
        name,"(x, y, w, h)",neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF
    (rows without the face box, as the current script writes them, are read too). Images are
    48x48 grayscale PNGs. Only the folders present become splits.

(b) The Kaggle file {FER_CSV} (columns emotion,pixels,Usage; from the ICML 2013 "Challenges in
    Representation Learning" facial expression challenge) next to Microsoft's {FERPLUS_CSV}
    (columns Usage,Image name,<10 vote counts>; row N labels row N of {FER_CSV}). Usage
    Training / PublicTest / PrivateTest becomes train / validation / test. Rows with a blank
    image name were dropped by FER+ and are counted as `not_in_ferplus`.

A folder from (a) takes precedence over (b) for its split.
"""


@dataclasses.dataclass(frozen=True)
class SplitRecords:
    """The raw content of one split: file names [N], votes int32 [N, 10], images uint8 [N, 48, 48]."""

    names: list[str]
    votes: np.ndarray
    images: np.ndarray
    source: str
    not_in_ferplus: int = 0


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


def read_label_csv(path: str) -> list[tuple[str, np.ndarray, int]]:
    """Rows (image name, votes [10], 1-based row number) of a FERPlus `label.csv`; validated."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: label file is missing")
    rows, seen = [], {}
    with open(path, newline="") as f:
        for number, fields in enumerate(csv.reader(f), start=1):
            if not fields:
                continue
            where = f"{path}, row {number}"
            if len(fields) == _NUM_VOTES + 2:  # name, face box, votes
                name, vote_fields = fields[0], fields[2:]
            elif len(fields) == _NUM_VOTES + 1:  # name, votes
                name, vote_fields = fields[0], fields[1:]
            else:
                raise DataError(
                    f"{where}: expected {_NUM_VOTES + 2} columns (name, face box, "
                    f"{_NUM_VOTES} vote counts) or {_NUM_VOTES + 1} (no face box), got {len(fields)}"
                )
            name = name.strip()
            if not name:
                raise DataError(f"{where}, field 'name': image name is empty")
            if name in seen:
                raise DataError(f"{where}: duplicate image name {name!r} (first on row {seen[name]})")
            seen[name] = number
            rows.append((name, _parse_votes(vote_fields, where), number))
    return rows


def read_folder(folder: str) -> SplitRecords:
    """Reads one FERPlus split folder (label.csv + PNGs), checking every row and image.

    The face box column is ignored: the reference reader uses the whole 48x48 image too.
    """
    label_path = os.path.join(folder, LABEL_FILE)
    rows = read_label_csv(label_path)
    images = np.zeros((len(rows), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, (name, _, number) in enumerate(rows):
        try:
            images[i] = read_grayscale(os.path.join(folder, name))
        except DataError as error:
            raise DataError(f"{error} (listed in {label_path}, row {number})") from None
    votes = np.stack([v for _, v, _ in rows]) if rows else np.zeros((0, _NUM_VOTES), np.int32)
    return SplitRecords([n for n, _, _ in rows], votes, images, source=folder)


def _read_csv_rows(path: str, header: tuple[str, ...]) -> list[list[str]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file is missing")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        found = next(reader, None)
        if found is None or tuple(x.strip() for x in found) != header:
            raise DataError(f"{path}, row 1: expected header {','.join(header)}, got {found}")
        rows = list(reader)
    for number, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            raise DataError(f"{path}, row {number}: expected {len(header)} columns, got {len(fields)}")
    return rows


def _parse_pixels(text: str, where: str) -> np.ndarray:
    try:
        values = np.array(text.split(), dtype=np.int64)
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


def read_kaggle(fer_path: str, ferplus_path: str, splits=None) -> dict[str, SplitRecords]:
    """Reads Kaggle `fer2013.csv` with Microsoft's aligned `fer2013new.csv`, by split.

    Row N of both files is the same image, whose FER+ name is `fer%07d.png` % N (0-based); a name
    that does not match means the files are not aligned, which is an error. Rows with a blank name
    were removed by FER+; they are skipped and counted in `not_in_ferplus`.
    """
    fer_rows = _read_csv_rows(fer_path, FER_HEADER)
    plus_rows = _read_csv_rows(ferplus_path, FERPLUS_HEADER)
    if len(fer_rows) != len(plus_rows):
        raise DataError(
            f"{ferplus_path}: {len(plus_rows)} data rows, but {fer_path} has {len(fer_rows)}; "
            "the two files must be row-aligned"
        )
    collected: dict[str, tuple[list, list, list, list]] = {}
    skipped: dict[str, int] = {}
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
        if splits is not None and split not in splits:
            continue
        name = plus_row[1].strip()
        if not name:
            skipped[split] = skipped.get(split, 0) + 1
            continue
        if name != f"fer{index:07d}.png":
            raise DataError(
                f"{ferplus_path}, row {number}, field 'Image name': {name!r}, expected "
                f"'fer{index:07d}.png'; the two files must be row-aligned"
            )
        names, votes, images, _ = collected.setdefault(split, ([], [], [], []))
        votes.append(_parse_votes(plus_row[2:], f"{ferplus_path}, row {number}"))
        images.append(_parse_pixels(fer_row[1], f"{fer_path}, row {number}"))
        names.append(name)
    for split in skipped:
        collected.setdefault(split, ([], [], [], []))
    records = {}
    for split, (names, votes, images, _) in collected.items():
        records[split] = SplitRecords(
            names,
            np.stack(votes) if votes else np.zeros((0, _NUM_VOTES), np.int32),
            np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
            source=f"{fer_path} + {ferplus_path}",
            not_in_ferplus=skipped.get(split, 0),
        )
    return records


def find_sources(manual_dir: str) -> dict[str, str]:
    """Which layout provides each split in `manual_dir`: {split: 'folder' | 'csv'}."""
    sources = {}
    for split, folder in SPLIT_FOLDERS.items():
        if os.path.isdir(os.path.join(manual_dir, folder)):
            sources[split] = "folder"
    if len(sources) < len(SPLIT_FOLDERS) and all(
        os.path.isfile(os.path.join(manual_dir, f)) for f in (FER_CSV, FERPLUS_CSV)
    ):
        for split in _csv_splits(os.path.join(manual_dir, FER_CSV)):
            sources.setdefault(split, "csv")
    return sources


def _csv_splits(fer_path: str) -> set[str]:
    found = set()
    with open(fer_path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for fields in reader:
            if len(fields) == len(FER_HEADER) and fields[2].strip() in USAGE_SPLITS:
                found.add(USAGE_SPLITS[fields[2].strip()])
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
    records = {}
    for split, kind in sources.items():
        if kind == "folder":
            records[split] = read_folder(os.path.join(manual_dir, SPLIT_FOLDERS[split]))
    csv_splits = [s for s, kind in sources.items() if kind == "csv"]
    if csv_splits:
        records.update(
            read_kaggle(
                os.path.join(manual_dir, FER_CSV),
                os.path.join(manual_dir, FERPLUS_CSV),
                splits=set(csv_splits),
            )
        )
    if not records:
        raise DataError(
            f"{manual_dir}: no FER+ data found (no {'/, '.join(SPLIT_FOLDERS.values())}/ folder "
            f"and no {FER_CSV} + {FERPLUS_CSV}).\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return records


class Ferplus(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """FER+: 48x48 grayscale faces with 10 crowd vote counts each (8 emotions, unknown, NF)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, raw vote counts and source file names."}
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
        self.info.metadata["not_in_ferplus"] = {s: r.not_in_ferplus for s, r in records.items()}
        self.info.metadata["sources"] = {s: r.source for s, r in records.items()}
        return {split: self._generate_examples(r) for split, r in records.items()}

    def _generate_examples(self, records: SplitRecords) -> Iterator[tuple[str, dict]]:
        for name, votes, image in zip(records.names, records.votes, records.images, strict=True):
            yield name, {"image": image[..., None], "votes": votes, "file_name": name}


def count_table(votes_by_split: dict[str, np.ndarray]) -> str:
    """A Markdown table of kept and dropped counts for every split and label mode."""
    rules = labels.ALL_DROP_RULES
    header = ["split", "label mode", "total", "kept"] + [f"dropped {r}" for r in rules]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, votes in votes_by_split.items():
        for mode in labels.LABEL_MODES:
            _, _, counts = labels.apply_label_mode(votes, mode)
            cells = [split, mode, f"{counts['total']:,}", f"{counts['kept']:,}"]
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


def main(argv) -> None:
    """Builds FER+ if needed and prints the per-split, per-label-mode counts."""
    del argv
    from absl import flags

    values = flags.FLAGS
    builder = Ferplus(data_dir=values.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=values.manual_dir))
    votes = {}
    for split in ("train", "validation", "test"):
        if split in builder.info.splits:
            votes[split] = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["votes"]
    print(count_table(votes))
    print()
    print("Images kept per class, majority mode:")
    print()
    print(class_table(votes))
    skipped = dict(builder.info.metadata.get("not_in_ferplus", {}))
    if any(skipped.values()):
        print(f"\nRows without a FER+ image name (skipped when building): {skipped}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("manual_dir", None, "Folder with the FER+ files.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS default).")
    # The builder is registered by the package import; run the registered module's code.
    from fermsca.datasets import ferplus as _registered

    app.run(_registered.main)
