"""Writers for tiny copies of the published dataset layouts (FER+ folders and csv, CK+, CK+48).

Everything is generated at test time into a temporary folder; no data files live in the repo.
"""

from __future__ import annotations

import csv
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

VOTE_COLUMNS = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)

# Hand-picked vote rows with their fate under each label mode (see labels.py); mode -> target or
# the rule that drops the row. Targets are over the 8 emotions.
VOTE_CASES = [
    # votes, {mode: target [8] or rule}
    (
        [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        {
            "majority": [1, 0, 0, 0, 0, 0, 0, 0],
            "crossentropy": [1, 0, 0, 0, 0, 0, 0, 0],
            "multi_target": [1, 0, 0, 0, 0, 0, 0, 0],
        },
    ),
    (  # single votes are outliers: only the 7 count
        [7, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        {
            "majority": [1, 0, 0, 0, 0, 0, 0, 0],
            "crossentropy": [1, 0, 0, 0, 0, 0, 0, 0],
            "multi_target": [1, 0, 0, 0, 0, 0, 0, 0],
        },
    ),
    (  # 6 + 4 of 10: majority neutral; crossentropy 0.6 / 0.4; multi-target both equally
        [6, 0, 0, 0, 4, 0, 0, 0, 0, 0],
        {
            "majority": [1, 0, 0, 0, 0, 0, 0, 0],
            "crossentropy": [0.6, 0, 0, 0, 0.4, 0, 0, 0],
            "multi_target": [0.5, 0, 0, 0, 0.5, 0, 0, 0],
        },
    ),
    (  # 4,3,2 of 9 after dropping the single vote: no majority; top two cover 7 >= 6.75
        [4, 3, 2, 1, 0, 0, 0, 0, 0, 0],
        {
            "majority": "no_majority",
            "crossentropy": [4 / 7, 3 / 7, 0, 0, 0, 0, 0, 0],
            "multi_target": [0.5, 0.5, 0, 0, 0, 0, 0, 0],
        },
    ),
    (  # 4 then a tie 3,3: three categories, 10 of 10 votes
        [4, 0, 0, 3, 3, 0, 0, 0, 0, 0],
        {
            "majority": "no_majority",
            "crossentropy": [0.4, 0, 0, 0.3, 0.3, 0, 0, 0],
            "multi_target": [1 / 3, 0, 0, 1 / 3, 1 / 3, 0, 0, 0],
        },
    ),
    (  # 3,3 then a tie 2,2: four categories taken at once
        [3, 3, 2, 2, 0, 0, 0, 0, 0, 0],
        {
            "majority": "no_majority",
            "crossentropy": "too_many_ties",
            "multi_target": [0.5, 0.5, 0, 0, 0, 0, 0, 0],
        },
    ),
    (  # unknown is the top: dropped everywhere
        [0, 0, 0, 0, 0, 0, 0, 0, 8, 2],
        {"majority": "top_not_emotion", "crossentropy": "top_not_emotion", "multi_target": "top_not_emotion"},
    ),
    (  # 5 neutral, then unknown stops the search at 5 of 10; multi-target counts unknown's 3
        [5, 0, 0, 0, 0, 0, 0, 0, 3, 2],
        {"majority": "no_majority", "crossentropy": "low_coverage", "multi_target": [1, 0, 0, 0, 0, 0, 0, 0]},
    ),
    (  # 2 neutral ties with unknown and NF: only 2 of 6 covered by crossentropy
        [2, 0, 0, 0, 0, 0, 0, 0, 2, 2],
        {"majority": "no_majority", "crossentropy": "low_coverage", "multi_target": [1, 0, 0, 0, 0, 0, 0, 0]},
    ),
    (  # five categories tie at 20% each: too many for crossentropy, none reaches 30%
        [2, 2, 2, 2, 2, 0, 0, 0, 0, 0],
        {"majority": "no_majority", "crossentropy": "too_many_ties", "multi_target": "low_coverage"},
    ),
    (  # every tagger alone: nothing is left
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        {"majority": "no_votes", "crossentropy": "no_votes", "multi_target": "no_votes"},
    ),
]

FERPLUS_SOURCE = Path("/tmp/ferplus")
FERPLUS_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ferplus-trainvalid.tar.gz"
FERPLUS_NEW_CSV = FERPLUS_ARCHIVE.parent / "fer2013new.csv"  # Microsoft's official file, as published


def noise_image(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def write_png(path: str | os.PathLike, pixels: np.ndarray, mode: str | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)


def ferplus_contents(rows_per_split: dict[str, int], seed: int = 0) -> dict[str, list]:
    """Per split, rows (name, votes, image); names follow the FER2013 row order across splits."""
    rng = np.random.default_rng(seed)
    contents, index = {}, 0
    for split, count in rows_per_split.items():
        rows = []
        for _ in range(count):
            votes = VOTE_CASES[index % len(VOTE_CASES)][0]
            rows.append((f"fer{index:07d}.png", list(votes), noise_image(rng)))
            index += 1
        contents[split] = rows
    return contents


FOLDERS = {"train": "FER2013Train", "validation": "FER2013Valid", "test": "FER2013Test"}
USAGES = {"train": "Training", "validation": "PublicTest", "test": "PrivateTest"}


def write_ferplus_folders(root, contents: dict[str, list], with_box: bool = True) -> None:
    """FERPlus `generate_training_data.py` layout: FER2013*/label.csv (no header) + PNGs."""
    for split, rows in contents.items():
        folder = os.path.join(root, FOLDERS[split])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "label.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            for name, votes, image in rows:
                box = ["(0, 0, 48, 48)"] if with_box else []
                writer.writerow([name] + box + votes)
                write_png(os.path.join(folder, name), image)


def write_ferplus_csv(
    root,
    contents: dict[str, list],
    dropped_rows: dict[str, int] | None = None,
    repeated: dict[str, int] | None = None,
) -> None:
    """Kaggle fer2013.csv + Microsoft fer2013new.csv as FERPlus's generator reads them: row N of one
    is row N of the other, and each image takes the name written in its fer2013new.csv row.

    As in the real files, the names drift from the row numbers: per split, `dropped_rows` spreads
    that many rows with a blank name (images FER+ removed, all votes on NF) among the images, and
    `repeated` puts that many rows, each with other pixels and votes, ahead of one of the split's
    last images under its name (the generator saves the later image over them). Read by FERPlus's
    rules, the files hold exactly `contents`, in order. A name may also repeat within `contents`.
    """
    fer = [["emotion", "pixels", "Usage"]]
    plus = [["Usage", "Image name", *VOTE_COLUMNS]]
    for split in ("train", "validation", "test"):
        images = contents.get(split, [])
        # Sort keys: image i at 2 i + 1; an extra row placed before image p at 2 p.
        placed = [(2 * i + 1, row) for i, row in enumerate(images)]
        blanks = (dropped_rows or {}).get(split, 0)
        for b in range(blanks):
            before = (b + 1) * len(images) // (blanks + 1)
            placed.append((2 * before, ("", [0] * 9 + [10], np.zeros((48, 48), np.uint8))))
        for k in range((repeated or {}).get(split, 0)):
            later = len(images) - 1 - k
            stray = (images[later][0], [0] * 9 + [10], np.full((48, 48), 7 + k, np.uint8))
            placed.append((2 * (later // 2), stray))
        for _, (name, votes, image) in sorted(placed, key=lambda item: item[0]):
            fer.append([0, " ".join(str(int(v)) for v in image.ravel()), USAGES[split]])
            plus.append([USAGES[split], name, *votes])
    for name, table in (("fer2013.csv", fer), ("fer2013new.csv", plus)):
        with open(os.path.join(root, name), "w", newline="") as f:
            csv.writer(f).writerows(table)


def write_ferplus_generator_labels(root, ferplus_csv) -> None:
    """The label.csv files the current FERPlus `generate_training_data.py` writes next to its PNGs:
    for each Usage, a row `name,<10 votes>` per fer2013new.csv row with a name, in file order,
    repeated names included (no face box)."""
    with open(ferplus_csv, newline="") as f:
        rows = list(csv.reader(f))[1:]
    for split, usage in USAGES.items():
        labelled = [row[1:] for row in rows if row[0] == usage and row[1].strip()]
        if labelled:
            os.makedirs(os.path.join(root, FOLDERS[split]), exist_ok=True)
            with open(os.path.join(root, FOLDERS[split], "label.csv"), "w", newline="") as f:
                csv.writer(f).writerows(labelled)


def write_kaggle_fer2013(path, ferplus_csv, images: dict[str, np.ndarray]) -> None:
    """A Kaggle-layout fer2013.csv row-aligned with `ferplus_csv` (Microsoft's fer2013new.csv): each
    row holds the image its fer2013new.csv row names, from `images` (name -> uint8 [48, 48], e.g.
    the PNGs of the FERPlus folders); a row whose image is not there (a blank name, a split with no
    folder) holds a placeholder, all zeros. Usage is copied; the emotion column is 0."""
    text = [str(v) for v in range(256)]
    placeholder = " ".join(["0"] * 48 * 48)
    with open(ferplus_csv, newline="") as f:
        rows = list(csv.reader(f))[1:]
    with open(path, "w", newline="") as f:
        f.write("emotion,pixels,Usage\n")
        for row in rows:
            image = images.get(row[1].strip())
            pixels = placeholder if image is None else " ".join([text[v] for v in image.ravel().tolist()])
            f.write(f"0,{pixels},{row[0]}\n")


# --------------------------------------------------------------------------------------------
# Real faces (for the Haar cascade) from the development copy of FER+, when present.


def real_faces(count: int) -> list[np.ndarray] | None:
    """Up to `count` 48x48 FER2013 faces, or None when no local FER+ copy is available."""
    label_file = FERPLUS_SOURCE / "FER2013Train" / "label.csv"
    faces = []
    if label_file.is_file():
        with open(label_file) as f:
            for row in csv.reader(f):
                path = label_file.parent / row[0]
                if path.is_file():
                    faces.append(np.asarray(Image.open(path).convert("L")))
                if len(faces) >= count:
                    break
        return faces or None
    if FERPLUS_ARCHIVE.is_file():
        with tarfile.open(FERPLUS_ARCHIVE, "r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".png"):
                    data = archive.extractfile(member)
                    faces.append(np.asarray(Image.open(data).convert("L")))
                    if len(faces) >= count:
                        break
        return faces or None
    return None


def ck_frame(face: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """A 640x490 CK+-like frame: a face upscaled to 240 px on a gray field (or no face)."""
    import cv2

    frame = np.full((490, 640), 120, np.uint8)
    frame = np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8)
    if face is not None:
        frame[110:350, 200:440] = cv2.resize(face, (240, 240), interpolation=cv2.INTER_CUBIC)
    return frame


def write_ckplus_official(root, sequences) -> list[tuple[str, int]]:
    """CK+ release layout. `sequences`: (subject, sequence, emotion text or None, frames [F]).

    Returns the paths (relative to root) and ranks of the frames a 3-frame build should keep.
    """
    expected = []
    for subject, sequence, emotion, frames in sequences:
        image_dir = os.path.join(root, "cohn-kanade-images", subject, sequence)
        names = [f"{subject}_{sequence}_{k + 1:08d}.png" for k in range(len(frames))]
        for name, frame in zip(names, frames, strict=True):
            write_png(os.path.join(image_dir, name), frame)
        label_dir = os.path.join(root, "Emotion", subject, sequence)
        os.makedirs(label_dir, exist_ok=True)
        if emotion is not None:
            last = names[-1][:-4] if names else f"{subject}_{sequence}_00000001"
            with open(os.path.join(label_dir, f"{last}_emotion.txt"), "w") as f:
                f.write(f"   {emotion}\n")
            for rank, name in enumerate(reversed(names[-3:])):
                expected.append((os.path.join("cohn-kanade-images", subject, sequence, name), rank))
    return expected


def write_ckplus48(root, entries) -> None:
    """CK+48 layout: CK+48/<class>/S###_###_########.png. `entries`: (class, file name, image)."""
    for label, name, image in entries:
        write_png(os.path.join(root, "CK+48", label, name), image)


# --------------------------------------------------------------------------------------------
# A video of two faces moving right (conftest's face_clip, for test_predict and test_webcam).

CLIP_SIZE = (320, 240)  # width, height
CLIP_FACE = 96
CLIP_PLACES = ((30, 60), (190, 70))  # top-left corners of the two faces in frame 0
CLIP_FRAMES = 12
CLIP_STEP = 2  # pixels the faces move right per frame


def clip_frame(two_faces, index: int) -> np.ndarray:
    import cv2

    canvas = np.full(CLIP_SIZE[::-1], 128, np.uint8)
    for face, (x, y) in zip(two_faces, CLIP_PLACES, strict=True):
        x += CLIP_STEP * index
        canvas[y:y + CLIP_FACE, x:x + CLIP_FACE] = cv2.resize(face, (CLIP_FACE, CLIP_FACE),
                                                               interpolation=cv2.INTER_CUBIC)
    return np.stack([canvas] * 3, axis=-1)


def clip_candidates():
    """Real FER2013 faces where the shared data is present; otherwise faces drawn by the
    built-in synthetic dataset, which the cascade finds too (tests/data holds no face images)."""
    real = real_faces(24)
    if real:
        return real
    from fermsca.datasets import synthetic_faces

    return [synthetic_faces.draw_face(i % 8, np.random.default_rng(i)) for i in range(24)]


def write_face_clip(path: str) -> list[np.ndarray]:
    """Writes the clip of `clip_frame` to `path` (mp4v, 10 frames/s); returns its frames as decoded.
    The faces are ones the cascade finds with a margin."""
    import cv2
    import haar_margin

    from fermsca import predict

    def alone(face, place):
        x, y = CLIP_PLACES[place]
        canvas = np.full(CLIP_SIZE[::-1], 128, np.uint8)
        canvas[y:y + CLIP_FACE, x:x + CLIP_FACE] = cv2.resize(face, (CLIP_FACE, CLIP_FACE),
                                                               interpolation=cv2.INTER_CUBIC)
        return canvas

    two = haar_margin.clear_faces(clip_candidates(), alone, count=2, draws=2)
    assert len(two) == 2, "fewer than two faces are found with a clear margin"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, CLIP_SIZE)
    assert writer.isOpened(), "this OpenCV build cannot write mp4v video"
    for i in range(CLIP_FRAMES):
        writer.write(cv2.cvtColor(clip_frame(two, i), cv2.COLOR_RGB2BGR))
    writer.release()
    decoded = [rgb for _, rgb in predict.video_frames(path)]
    assert len(decoded) == CLIP_FRAMES
    return decoded


def left_right_tracks(records):
    """Per frame, (track of the left face, track of the right face)."""
    by_frame = {}
    for r in records:
        by_frame.setdefault(r["frame"], []).append(r)
    return {frame: tuple(r["track"] for r in sorted(rs, key=lambda r: r["box"][0]))
            for frame, rs in by_frame.items()}
