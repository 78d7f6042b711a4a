"""Extended Cohn-Kanade (CK+) as a TFDS builder, with subject-independent evaluation protocols.

Lucey et al., "The Extended Cohn-Kanade Dataset (CK+)", CVPR Workshops 2010. 593 posed sequences
of 123 subjects, each from neutral to the peak expression; 327 sequences carry one of 7 emotion
labels. Two source layouts, as builder configs:

* `official`: the CK+ release (`cohn-kanade-images/` + `Emotion/`). The last frames of every
  labelled sequence are kept (the expression is at its peak at the end), the face is found with
  OpenCV's frontal-face Haar cascade, cropped and resized to 48x48 grayscale.
* `ckplus48`: the widely shared `CK+48/<class>/S###_###_########.png` folders of 48x48 crops
  (usually the last 3 frames of each labelled sequence).

`frame_rank` is 0 for the last frame of a sequence, 1 for the one before, and so on.

Protocol. The paper (Wang & Zhang 2023) does not state how CK+ was split. CK+ has only 327
labelled sequences, and consecutive frames of one sequence are near duplicates: a random split by
image puts frames of the same sequence (and the same person) on both sides, so test accuracy
measures recognition of a seen face rather than of an expression, and comes out inflated. We
therefore default to subject-independent k-fold cross-validation (no subject in two folds) and
keep image-level random k-fold cross-validation (`protocol="random"`) only to compare with papers
that used it. Both protocols take the test fold `fold` and the next fold as validation.
`protocol="all"` puts every image in `train` (no validation or test split), for the released model,
whose accuracy is the cross-validated one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from fermsca import faces
from fermsca.datasets import labels
from fermsca.datasets._common import (
    IMAGE_SIZE,
    DataError,
    Dataset,
    Split,
    one_hot,
    prepare,
    read_grayscale,
    read_split,
)

CLASS_NAMES = labels.CKPLUS_EMOTIONS
# Emotion codes of the official release: 0 (neutral) is never used as a sequence label.
EMOTION_CODES = {code: name for code, name in enumerate(CLASS_NAMES, start=1)}
DEFAULT_FRAMES = 3
CENTER_CROP_FRACTION = 0.6  # side of the fallback centre crop, relative to the shorter image side

IMAGES_FOLDER = "cohn-kanade-images"
EMOTION_FOLDER = "Emotion"
CKPLUS48_FOLDER = "CK+48"

_FRAME_NAME = re.compile(r"^(S\d{3})_(\d{3})_(\d{8})\.png$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".png",)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
CK+ is distributed on request (https://www.jeffcohn.net/Resources/, "CK+ database"); accept its
licence and put one of these in the manual directory:

  official: the release folders {IMAGES_FOLDER}/ and {EMOTION_FOLDER}/ (directly in the manual
    directory or one folder below it), i.e.
        {IMAGES_FOLDER}/S005/001/S005_001_00000001.png ...
        {EMOTION_FOLDER}/S005/001/S005_001_00000011_emotion.txt   (one number, e.g. 3.0000000e+00)
    with codes 1 anger, 2 contempt, 3 disgust, 4 fear, 5 happy, 6 sadness, 7 surprise.
  ckplus48: the 48x48 crops {CKPLUS48_FOLDER}/<{"|".join(CLASS_NAMES)}>/S###_###_########.png
    (the {CKPLUS48_FOLDER} folder itself, or its class folders directly in the manual directory).
"""


@dataclasses.dataclass(frozen=True)
class Frame:
    """One source image and its annotations."""

    path: str
    label: int  # index into CLASS_NAMES
    subject: str  # "S005"
    sequence: str  # "001"
    frame_rank: int  # 0 = last frame of the sequence


# --------------------------------------------------------------------------------------------
# Reading the official release.


def _find_folder(manual_dir: str, name: str) -> str | None:
    for candidate in [os.path.join(manual_dir, name)] + [
        os.path.join(manual_dir, child, name) for child in sorted(os.listdir(manual_dir))
    ]:
        if os.path.isdir(candidate):
            return candidate
    return None


def read_emotion_file(path: str) -> int:
    """The class index (into CLASS_NAMES) stored in one `*_emotion.txt` file."""
    with open(path) as f:
        tokens = f.read().split()
    if len(tokens) != 1:
        raise DataError(f"{path}: expected one emotion code, found {len(tokens)} values")
    try:
        value = float(tokens[0])
    except ValueError:
        raise DataError(f"{path}: emotion code {tokens[0]!r} is not a number") from None
    if value != int(value) or int(value) not in EMOTION_CODES:
        raise DataError(
            f"{path}: unknown emotion code {tokens[0]!r}; expected one of "
            + ", ".join(f"{c} {n}" for c, n in EMOTION_CODES.items())
        )
    return int(value) - 1


def scan_official(manual_dir: str, frames_per_sequence: int) -> list[Frame]:
    """The last `frames_per_sequence` frames of every labelled sequence, in subject order."""
    images_dir = _find_folder(manual_dir, IMAGES_FOLDER)
    emotion_dir = _find_folder(manual_dir, EMOTION_FOLDER)
    if images_dir is None or emotion_dir is None:
        missing = [n for n, d in ((IMAGES_FOLDER, images_dir), (EMOTION_FOLDER, emotion_dir)) if not d]
        raise DataError(
            f"{manual_dir}: CK+ official layout needs the folder(s) {', '.join(missing)}/.\n"
            + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    frames = []
    for subject in sorted(os.listdir(emotion_dir)):
        subject_dir = os.path.join(emotion_dir, subject)
        if not os.path.isdir(subject_dir):
            continue
        for sequence in sorted(os.listdir(subject_dir)):
            sequence_dir = os.path.join(subject_dir, sequence)
            if not os.path.isdir(sequence_dir):
                continue
            label_files = sorted(f for f in os.listdir(sequence_dir) if f.endswith("_emotion.txt"))
            if not label_files:
                continue  # an unlabelled sequence
            if len(label_files) > 1:
                raise DataError(f"{sequence_dir}: more than one emotion file: {label_files}")
            label_path = os.path.join(sequence_dir, label_files[0])
            label = read_emotion_file(label_path)
            image_dir = os.path.join(images_dir, subject, sequence)
            names = (
                sorted(f for f in os.listdir(image_dir) if f.lower().endswith(_IMAGE_SUFFIXES))
                if os.path.isdir(image_dir)
                else []
            )
            if not names:
                raise DataError(f"{label_path}: labelled sequence has no frames in {image_dir}")
            for rank, name in enumerate(reversed(names[-frames_per_sequence:])):
                frames.append(Frame(os.path.join(image_dir, name), label, subject, sequence, rank))
    if not frames:
        raise DataError(f"{emotion_dir}: no *_emotion.txt files found")
    return frames


def detect_face(gray: np.ndarray) -> faces.Box | None:
    """The largest frontal face (x, y, w, h) of a CK+ frame, or None; faces under 1/5 of the frame
    side (and under 24 px) are ignored."""
    boxes = faces.detect_faces(gray, min_size=max(24, min(gray.shape) // 5))
    return boxes[0] if boxes else None


def crop_faces(paths: Sequence[str], allow_center_crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 [N, 48, 48] and a bool [N] marking centre crops (no face found).

    Without `allow_center_crop`, any image without a detected face is an error listing them all.
    """
    crops = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    centered = np.zeros(len(paths), bool)
    for i, path in enumerate(paths):
        gray = read_grayscale(path, size=None)
        box = detect_face(gray)
        if box is not None:
            crops[i] = faces.crop_face(gray, box, margin=0.0, size=IMAGE_SIZE)
        else:
            centered[i] = True
            crops[i] = faces.center_crop(gray, IMAGE_SIZE, fraction=CENTER_CROP_FRACTION)
    if centered.any() and not allow_center_crop:
        failed = [p for p, c in zip(paths, centered, strict=True) if c]
        raise DataError(
            f"no face found in {len(failed)} image(s) (set allow_center_crop to use a centre crop "
            "instead):\n  " + "\n  ".join(failed)
        )
    return crops, centered


def is_label_file(name: str) -> bool:
    """The official release's label files (CK+48 keeps labels in its folder names)."""
    return name.endswith("_emotion.txt")


def source_entries(manual_dir: str, layout: str) -> list[str]:
    """The files and folders under `manual_dir` that a build of `layout` reads (for its fingerprint)."""
    if not os.path.isdir(manual_dir):
        return []
    if layout == "official":
        found = [_find_folder(manual_dir, name) for name in (IMAGES_FOLDER, EMOTION_FOLDER)]
        return [os.path.relpath(f, manual_dir) for f in found if f]
    if os.path.isdir(os.path.join(manual_dir, CKPLUS48_FOLDER)):
        return [CKPLUS48_FOLDER]
    return [d for d in CLASS_NAMES if os.path.isdir(os.path.join(manual_dir, d))]


# --------------------------------------------------------------------------------------------
# Reading CK+48.


def scan_ckplus48(manual_dir: str) -> list[Frame]:
    """Every image of the CK+48 class folders; frame_rank counts back from each sequence's end."""
    root = os.path.join(manual_dir, CKPLUS48_FOLDER)
    if not os.path.isdir(root):
        root = manual_dir
    class_dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not any(d in CLASS_NAMES for d in class_dirs):
        raise DataError(
            f"{manual_dir}: no CK+48 class folders ({', '.join(CLASS_NAMES)}) found, neither there "
            f"nor in {CKPLUS48_FOLDER}/.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    entries, seen = [], {}
    for folder in class_dirs:
        folder_path = os.path.join(root, folder)
        if folder not in CLASS_NAMES:
            raise DataError(f"{folder_path}: unknown CK+48 class folder {folder!r}; expected {CLASS_NAMES}")
        for name in sorted(os.listdir(folder_path)):
            path = os.path.join(folder_path, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            match = _FRAME_NAME.match(name)
            if match is None:
                raise DataError(f"{path}: file name is not of the form S###_###_########.png")
            if name.lower() in seen:
                raise DataError(f"{path}: duplicate file name (also {seen[name.lower()]})")
            seen[name.lower()] = path
            subject, sequence, number = match.groups()
            entries.append((subject.upper(), sequence, int(number), path, CLASS_NAMES.index(folder)))
    entries.sort()
    frames = []
    for i, (subject, sequence, _, path, label) in enumerate(entries):
        # Frames of a sequence are adjacent after sorting; rank = frames after this one.
        rank = 0
        while i + rank + 1 < len(entries) and entries[i + rank + 1][:2] == (subject, sequence):
            rank += 1
        frames.append(Frame(path, label, subject, sequence, rank))
    return frames


# --------------------------------------------------------------------------------------------
# Builder.


@dataclasses.dataclass
class CkplusConfig(tfds.core.BuilderConfig):
    """`layout` is 'official' or 'ckplus48'; official keeps the last `frames_per_sequence` frames."""

    layout: str = "official"
    frames_per_sequence: int = DEFAULT_FRAMES


def official_config(frames_per_sequence: int = DEFAULT_FRAMES) -> CkplusConfig:
    """The official-layout config that stores the last `frames_per_sequence` frames."""
    if frames_per_sequence == DEFAULT_FRAMES:
        return Ckplus.BUILDER_CONFIGS[0]
    return CkplusConfig(
        name=f"official_last{frames_per_sequence}",
        description=f"CK+ release, last {frames_per_sequence} frames of each labelled sequence.",
        layout="official",
        frames_per_sequence=frames_per_sequence,
    )


class Ckplus(tfds.core.GeneratorBasedBuilder):
    """CK+ expression images, 7 classes, with subject and sequence ids (single split `train`).

    Pass `allow_center_crop=True` to keep official-layout frames where no face is found, as a
    centre crop marked by the `center_cropped` feature, instead of failing.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official and CK+48 layouts."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        CkplusConfig(
            name="official",
            description="CK+ release, face-cropped with a Haar cascade; last 3 frames per sequence.",
            layout="official",
        ),
        CkplusConfig(
            name="ckplus48",
            description="The shared CK+48 folders of 48x48 crops.",
            layout="ckplus48",
        ),
    ]

    def __init__(self, *, allow_center_crop: bool = False, **kwargs):
        self._allow_center_crop = allow_center_crop
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "subject": tfds.features.Text(),
                    "sequence": tfds.features.Text(),
                    "frame_rank": tfds.features.Scalar(dtype=np.int32),
                    "center_cropped": tfds.features.Scalar(dtype=np.bool_),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.jeffcohn.net/Resources/",
            citation="""@inproceedings{Lucey2010CKPlus,
  title={The Extended Cohn-Kanade Dataset (CK+): A complete dataset for action unit and
         emotion-specified expression},
  author={Lucey, Patrick and Cohn, Jeffrey F. and Kanade, Takeo and Saragih, Jason and
          Ambadar, Zara and Matthews, Iain},
  booktitle={CVPR Workshops},
  year={2010}
}""",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Scanning, validation and face detection all happen here, before anything is written.
        manual_dir = os.fspath(dl_manager.manual_dir)
        if self.builder_config.layout == "official":
            frames = scan_official(manual_dir, self.builder_config.frames_per_sequence)
            images, centered = crop_faces([f.path for f in frames], self._allow_center_crop)
        else:
            frames = scan_ckplus48(manual_dir)
            images = np.stack([read_grayscale(f.path) for f in frames])
            centered = np.zeros(len(frames), bool)
        root = os.path.abspath(manual_dir)
        return {"train": self._generate_examples(frames, images, centered, root)}

    def _generate_examples(self, frames, images, centered, root) -> Iterator[tuple[str, dict]]:
        for frame, image, center in zip(frames, images, centered, strict=True):
            name = os.path.relpath(os.path.abspath(frame.path), root)
            yield (
                name,
                {
                    "image": image[..., None],
                    "label": frame.label,
                    "subject": frame.subject,
                    "sequence": frame.sequence,
                    "frame_rank": frame.frame_rank,
                    "center_cropped": bool(center),
                    "file_name": name,
                },
            )


# --------------------------------------------------------------------------------------------
# Evaluation protocols (applied at load time).


def subject_folds(subjects: Sequence[str], num_folds: int, seed: int = 0) -> dict[str, int]:
    """Assigns every subject to one of `num_folds` folds, balancing the number of images.

    Deterministic for a given (set of subjects with their image counts, num_folds, seed): subjects
    are put in a seeded random order, then taken largest first (stable) and each given to the
    fold holding the fewest images so far (lowest fold index on ties).
    """
    names, sizes = np.unique(np.asarray(subjects, dtype=str), return_counts=True)
    if num_folds < 3:
        raise ValueError(f"num_folds must be >= 3 (test, validation and train folds), got {num_folds}")
    if len(names) < num_folds:
        raise ValueError(f"{len(names)} subjects cannot fill {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(num_folds, np.int64)
    folds = {}
    for i in order:
        fold = int(np.argmin(load))
        folds[str(names[i])] = fold
        load[fold] += sizes[i]
    return folds


def kfold_indices(
    subjects: Sequence[str], num_folds: int = 10, fold: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Subject-independent split: fold `fold` is test, fold (fold+1) % num_folds validation."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    assignment = subject_folds(subjects, num_folds, seed)
    folds = np.array([assignment[str(s)] for s in subjects])
    validation = (fold + 1) % num_folds
    return {
        "train": np.flatnonzero((folds != fold) & (folds != validation)),
        "validation": np.flatnonzero(folds == validation),
        "test": np.flatnonzero(folds == fold),
    }


def random_indices(num_examples: int, num_folds: int = 10, fold: int = 0, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Image-level random k-fold split: the images, shuffled with `seed`, are dealt into `num_folds`
    folds of equal size (+-1); fold `fold` is test, fold (fold+1) % num_folds validation, as in
    `kfold_indices`. Every image is in exactly one test fold over the k folds.

    Frames of one sequence land on both sides, which inflates accuracy; see the module docstring.
    """
    if num_folds < 3:
        raise ValueError(f"num_folds must be >= 3 (test, validation and train folds), got {num_folds}")
    if num_examples < num_folds:
        raise ValueError(f"{num_examples} images cannot fill {num_folds} folds")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    folds = np.empty(num_examples, np.int64)
    folds[np.random.default_rng(seed).permutation(num_examples)] = np.arange(num_examples) % num_folds
    validation = (fold + 1) % num_folds
    return {
        "train": np.flatnonzero((folds != fold) & (folds != validation)),
        "validation": np.flatnonzero(folds == validation),
        "test": np.flatnonzero(folds == fold),
    }


# --------------------------------------------------------------------------------------------
# Loading: the stored build, its last frames, split by the protocol.


def load(config: ml_collections.ConfigDict, required: Sequence[str] = ()) -> Dataset:
    """Builds CK+ (`config.builder_config`) if needed, keeps the last `frames_per_sequence` frames
    of each sequence and splits them by `config.protocol` (kfold | random | all)."""
    missing = [s for s in required if s != "train"] if config.protocol == "all" else []
    if missing:
        raise DataError(f"ckplus: protocol 'all' puts every image in train, so there is no "
                        f"{' or '.join(missing)} split: nothing is held out to evaluate on (a model "
                        "trained this way is scored by cross-validation: protocol 'kfold' or 'random')")
    frames = int(config.frames_per_sequence)
    if frames < 1:
        raise ValueError(f"frames_per_sequence must be >= 1, got {frames}")
    layout = config.builder_config
    if layout == "official":
        builder_config = official_config(max(frames, DEFAULT_FRAMES))
    elif layout == "ckplus48":
        builder_config = layout
    else:
        raise ValueError(f"unknown CK+ builder_config {layout!r}; expected 'official' or 'ckplus48'")
    allow_center_crop = bool(config.allow_center_crop)
    builder = Ckplus(config=builder_config, data_dir=config.data_dir,
                     allow_center_crop=allow_center_crop)
    manual_dir = config.manual_dir
    entries = [] if manual_dir is None else source_entries(manual_dir, layout)
    source = prepare(builder, manual_dir, entries, bool(config.rebuild), is_label_file)
    data = read_split(builder, "train")
    if data["center_cropped"].any() and not allow_center_crop:
        failed = data["file_name"][data["center_cropped"]]
        raise DataError(
            f"ckplus: the stored dataset holds {len(failed)} centre crop(s) where no face was "
            "found (built with allow_center_crop); set allow_center_crop to use them:\n  "
            + "\n  ".join(failed)
        )
    selected = np.flatnonzero(data["frame_rank"] < frames)
    parts = protocol_indices(config, data["subject"][selected])
    splits = {}
    for split, local in parts.items():
        index = selected[local]
        splits[split] = Split(
            images=data["image"][index],
            targets=one_hot(data["label"][index], len(CLASS_NAMES)),
            sample_labels=False,
            counts={
                "total": len(index),
                "kept": len(index),
                "center_cropped": int(data["center_cropped"][index].sum()),
            },
            file_names=data["file_name"][index],
        )
    return Dataset("ckplus", CLASS_NAMES, splits, source)


def protocol_indices(config: ml_collections.ConfigDict, subjects: Sequence[str]) -> dict[str, np.ndarray]:
    """{split: indices into `subjects`} by `config.protocol`: `kfold_indices`, `random_indices`, or
    every index in train ('all')."""
    if config.protocol == "all":
        return {"train": np.arange(len(subjects))}
    folds = dict(num_folds=int(config.num_folds), fold=int(config.fold), seed=int(config.split_seed))
    if config.protocol == "kfold":
        return kfold_indices(subjects, **folds)
    if config.protocol == "random":
        return random_indices(len(subjects), **folds)
    raise ValueError(f"unknown CK+ protocol {config.protocol!r}; expected 'kfold', 'random' or 'all'")
