"""Procedurally drawn 48x48 grayscale faces with 8 expression classes (the FER+ emotions).

The built-in dataset of the default configuration: no download, built in seconds, deterministic.
Each class sets the mean of a few facial action parameters (mouth corner lift, opening and width,
eye opening, brow height and slant, one-sided smile, nose wrinkle); every image draws them around
those means, so neighbouring classes overlap a little. Identity (face shape, skin tone, eye
spacing, hair, background, lighting gradient), pose (shift, scale, in-plane rotation) and pixel
noise vary independently of the class. A CNN separates the classes well; a linear classifier on
raw pixels does not, because the cues are small, local and move with the pose.

Faces are drawn with anti-aliased OpenCV primitives on a 4x canvas and area-downsampled to 48x48.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import cv2
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from fermsca.datasets._common import IMAGE_SIZE, Dataset, Split, one_hot, prepare, read_split
from fermsca.datasets.labels import EMOTIONS

CLASS_NAMES = EMOTIONS
SPLIT_SIZES = {"train": 4000, "validation": 800, "test": 800}
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}

_SUPERSAMPLE = 4
_CANVAS = IMAGE_SIZE * _SUPERSAMPLE
_SHIFT = 1 << 4  # fixed-point fraction bits for cv2 drawing (sub-pixel positions)


@dataclasses.dataclass(frozen=True)
class Expression:
    """Mean facial action parameters of one class (dimensionless; 0 is a neutral face)."""

    corner_lift: float = 0.0  # mouth corners up (+) or down (-)
    mouth_open: float = 0.0  # 0 closed .. ~1.3 wide open
    mouth_width: float = 1.0  # relative to a neutral mouth
    eye_open: float = 1.0  # relative eye height
    brow_raise: float = 0.0  # brows up (+) or down (-)
    brow_slant: float = 0.0  # inner brow ends up (+, sad / fearful) or down (-, angry)
    one_sided: float = 0.0  # extra lift of one mouth corner (contempt)
    wrinkle: float = 0.0  # nose wrinkle and raised upper lip (disgust)


EXPRESSIONS = {
    "neutral": Expression(),
    "happiness": Expression(corner_lift=1.0, mouth_open=0.35, mouth_width=1.25, eye_open=0.7),
    "surprise": Expression(mouth_open=1.2, mouth_width=0.7, eye_open=1.5, brow_raise=1.0),
    "sadness": Expression(corner_lift=-0.8, mouth_width=0.9, eye_open=0.8, brow_slant=0.9),
    "anger": Expression(
        corner_lift=-0.3,
        mouth_open=0.05,
        mouth_width=0.85,
        eye_open=0.8,
        brow_raise=-0.7,
        brow_slant=-1.0,
    ),
    "disgust": Expression(
        corner_lift=-0.5,
        mouth_open=0.25,
        mouth_width=0.95,
        eye_open=0.65,
        brow_raise=-0.4,
        brow_slant=-0.4,
        wrinkle=1.0,
    ),
    "fear": Expression(
        corner_lift=-0.3,
        mouth_open=0.7,
        mouth_width=1.15,
        eye_open=1.4,
        brow_raise=0.7,
        brow_slant=0.8,
    ),
    "contempt": Expression(corner_lift=0.15, eye_open=0.9, one_sided=0.9),
}

# Per-image spread of each parameter around its class mean.
_SPREAD = Expression(
    corner_lift=0.2,
    mouth_open=0.12,
    mouth_width=0.08,
    eye_open=0.15,
    brow_raise=0.2,
    brow_slant=0.2,
    one_sided=0.15,
    wrinkle=0.2,
)


def _point(x: float, y: float) -> tuple[int, int]:
    return int(round(x * (1 << _SHIFT))), int(round(y * (1 << _SHIFT)))


def _polyline(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def _ellipse(canvas, centre, axes, value, start=0, end=360) -> None:
    """Filled anti-aliased ellipse (or the arc sector from `start` to `end` degrees)."""
    cv2.ellipse(canvas, _point(*centre), _point(*axes), 0, start, end, float(value), -1, cv2.LINE_AA, _SHIFT)


def _line(canvas, a, b, value, thickness) -> None:
    cv2.line(canvas, _point(*a), _point(*b), float(value), thickness, cv2.LINE_AA, _SHIFT)


def _fill(canvas, outline: np.ndarray, value) -> None:
    cv2.fillPoly(canvas, [_polyline(outline)], float(value), cv2.LINE_AA, _SHIFT)


def _sample_action(expression: Expression, rng: np.random.Generator) -> dict[str, float]:
    action = {}
    for field in dataclasses.fields(Expression):
        mean = getattr(expression, field.name)
        action[field.name] = mean + getattr(_SPREAD, field.name) * rng.standard_normal()
    action["mouth_open"] = max(action["mouth_open"], 0.0)
    action["mouth_width"] = max(action["mouth_width"], 0.5)
    action["eye_open"] = max(action["eye_open"], 0.25)
    action["wrinkle"] = max(action["wrinkle"], 0.0)
    if expression.one_sided and rng.random() < 0.5:  # smirk on either side
        action["one_sided"] = -action["one_sided"]
    return action


def draw_face(label: int, rng: np.random.Generator) -> np.ndarray:
    """One face of class `label` (index into CLASS_NAMES); uint8 [48, 48]."""
    act = _sample_action(EXPRESSIONS[CLASS_NAMES[label]], rng)
    s = _CANVAS

    background = rng.uniform(20, 235)
    canvas = np.full((s, s), background, np.float32)
    for _ in range(3):  # background texture: a few blobs, so the field is not flat
        centre, radius = rng.uniform(0, s, 2), rng.uniform(0.1, 0.4) * s
        _ellipse(canvas, centre, (radius, radius), np.clip(background + rng.normal(0, 30), 0, 255))

    # Identity.
    cx, cy = s / 2, s * 0.52
    half_w, half_h = s * rng.uniform(0.30, 0.36), s * rng.uniform(0.37, 0.44)
    skin = rng.uniform(90, 215)
    dark = skin * rng.uniform(0.15, 0.4)  # features (eyes, brows, mouth line)
    eye_dx = half_w * rng.uniform(0.36, 0.48)
    eye_y = cy - half_h * rng.uniform(0.12, 0.22)
    eye_w = half_w * rng.uniform(0.17, 0.21)
    mouth_y = cy + half_h * rng.uniform(0.45, 0.55)

    _ellipse(canvas, (cx, cy), (half_w, half_h), skin)
    # Hair: the upper half of a slightly larger ellipse, then the forehead below a random hairline.
    hair = np.clip(skin * rng.uniform(0.1, 1.3), 0, 255)
    hairline = rng.uniform(0.55, 0.85)
    _ellipse(canvas, (cx, cy - half_h * 0.15), (half_w * 1.06, half_h * 0.95), hair, 180, 360)
    forehead = (cx, cy + half_h * (0.8 - hairline))
    _ellipse(canvas, forehead, (half_w * 0.98, half_h * hairline), skin, 180, 360)

    # Eyes and brows, mirrored; `side` is -1 for the image-left eye.
    line = max(2, int(round(s * 0.026)))
    for side in (-1, 1):
        ex = cx + side * eye_dx
        eye_h = eye_w * 0.5 * act["eye_open"]
        _ellipse(canvas, (ex, eye_y), (eye_w, eye_h), min(255, skin * 1.25 + 20))
        iris = min(eye_h, eye_w * 0.55)
        _ellipse(canvas, (ex, eye_y), (iris, iris), dark)
        brow_y = eye_y - half_h * (0.17 + 0.09 * act["brow_raise"]) - eye_h * 0.3
        inner = (ex - side * eye_w * 0.9, brow_y - half_h * 0.07 * act["brow_slant"])
        outer = (ex + side * eye_w * 1.2, brow_y + half_h * 0.02 * act["brow_slant"])
        _line(canvas, inner, outer, dark, line + 1)

    # Nose, with wrinkle lines for disgust.
    nose_top, nose_tip = eye_y + half_h * 0.08, cy + half_h * 0.22
    _line(canvas, (cx, nose_top), (cx, nose_tip), skin * 0.8, line)
    _line(canvas, (cx - half_w * 0.12, nose_tip), (cx + half_w * 0.12, nose_tip), skin * 0.6, line)
    if act["wrinkle"] > 0.3:
        for side in (-1, 1):
            for k in range(2):
                y = nose_top + half_h * (0.08 + 0.07 * k)
                x0 = cx + side * half_w * 0.06
                x1 = cx + side * half_w * (0.06 + 0.13 * min(act["wrinkle"], 1.5))
                _line(canvas, (x0, y), (x1, y - half_h * 0.04), skin * 0.65, line)

    # Mouth: a centre line bent by the corner lift (and one-sided lift), opened around it.
    t = np.linspace(-1, 1, 25)
    mouth_half = half_w * 0.36 * act["mouth_width"]
    lift = act["corner_lift"] + act["one_sided"] * t
    centre = mouth_y - half_h * 0.13 * lift * t**2
    upper_raise = half_h * 0.05 * act["wrinkle"]
    upper = centre - (half_h * 0.07 * act["mouth_open"] + upper_raise) * (1 - t**2)
    lower = centre + half_h * 0.13 * act["mouth_open"] * (1 - t**2)
    xs = cx + mouth_half * t
    if act["mouth_open"] + upper_raise / half_h > 0.08:
        _fill(canvas, np.concatenate([np.stack([xs, upper], 1), np.stack([xs, lower], 1)[::-1]]), dark * 0.6)
        if act["corner_lift"] > 0.5 and act["mouth_open"] > 0.2:  # teeth in a broad smile
            teeth_edge = upper + (lower - upper) * 0.35
            teeth = np.concatenate([np.stack([xs, upper], 1), np.stack([xs, teeth_edge], 1)[::-1]])
            _fill(canvas, teeth[1:-1], min(255, skin * 1.3 + 20))
    cv2.polylines(
        canvas, [_polyline(np.stack([xs, centre], 1))], False, float(dark), line, cv2.LINE_AA, _SHIFT
    )

    # Pose: in-plane rotation, scale and shift about the canvas centre.
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.88, 1.12)
    matrix = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-3, 3, 2) * _SUPERSAMPLE
    canvas = cv2.warpAffine(canvas, matrix, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    image = cv2.resize(canvas, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)

    # Lighting: a linear gradient in a random direction, contrast, then sensor noise.
    yy, xx = np.mgrid[-1 : 1 : IMAGE_SIZE * 1j, -1 : 1 : IMAGE_SIZE * 1j]
    direction = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(direction) * xx + np.sin(direction) * yy
    image = image * (1 + rng.uniform(0, 0.35) * gradient) * rng.uniform(0.75, 1.15)
    image = image + rng.normal(0, rng.uniform(3, 10), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def generate(num_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced, shuffled faces: images uint8 [N, 48, 48, 1], labels int64 [N].

    N = 8 * num_per_class; the same (num_per_class, seed) always gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), num_per_class))
    images = np.stack([draw_face(int(label), rng) for label in labels])
    return images[..., None], labels


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
    """Synthetic 48x48 expression faces (8 FER+ classes); train 4000 / validation 800 / test 800."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        per_class = SPLIT_SIZES[split] // len(CLASS_NAMES)
        images, labels = generate(per_class, SPLIT_SEEDS[split])
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"{split}/{i:05d}_{CLASS_NAMES[label]}.png"
            yield name, {"image": image, "label": int(label), "file_name": name}


def load(config: ml_collections.ConfigDict, required: Sequence[str] = ()) -> Dataset:
    """Builds the set into `config.data_dir` on first use (seconds) and reads every split."""
    del required  # every split is always there
    builder = SyntheticFaces(data_dir=config.data_dir)
    prepare(builder, None)
    splits = {}
    for split in SPLIT_SIZES:
        data = read_split(builder, split)
        n = len(data["label"])
        splits[split] = Split(
            images=data["image"],
            targets=one_hot(data["label"], len(CLASS_NAMES)),
            sample_labels=False,
            counts={"total": n, "kept": n},
            file_names=data["file_name"],
        )
    return Dataset("synthetic_faces", CLASS_NAMES, splits)
