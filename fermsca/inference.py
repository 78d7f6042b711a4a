"""The public Python API: load a trained FERNet and classify faces in NumPy arrays.

    from fermsca import inference

    model = inference.load()                 # the released FER+ weights, shipped with the package
    model = inference.load("runs/ferplus")   # a workdir, its checkpoints/ or best/, or a step folder
    model.class_names                        # ("neutral", "happiness", ...): the K output classes
    probs = model.classify(faces)            # uint8 [N, 48, 48] or [N, 48, 48, 1] -> float32 [N, K]
    probs = model.classify(faces, tta=True)  # averaged over mirror images and 2-pixel shifts
    for face in model.classify_image(rgb):   # uint8 [H, W, 3]: Haar detection, crops, classes
        print(face.box, face.label, face.score)

Faces are 48x48 grayscale with pixel values 0-255; each is standardised inside the model call
(`augment.preprocess`, the evaluation preprocessing of training). The pure functions (`tta_views`,
`logits`, `probabilities`) are what `python -m fermsca.export` serialises. Importing this module
does not import OpenCV: only `classify_image` and `face_crops` (face detection) do. The tools
`fermsca.predict`, `fermsca.evaluate` and `fermsca.export` are built on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fermsca import augment, checkpoint, models, perf

Array = jax.Array

FACE_SIZE = 48  # the model's input: [N, 48, 48, 1] grayscale
DEFAULT_TTA_SHIFT = 2  # pixels: training shifts by up to 5% of 48, about 2.4
# The released weights (README, "Released weights"), package data of fermsca: FER+ (8 classes, the
# default everywhere) and CK+ (7 classes, trained on every CK+48 image after cross-validation).
RELEASED_FERPLUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released", "ferplus")
RELEASED_CKPLUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released", "ckplus")
# Config fields that older checkpoints hold and this version no longer has, with the value under
# which the code that remains computes the same thing (any other value cannot be honoured), or
# ANY_VALUE for fields that never touched the model.
ANY_VALUE = object()
REMOVED_FIELDS = {
    "model.fuse_projection": False,  # one wider convolution for 1x1 branch + projection (speed)
    "dataset.test_fraction": ANY_VALUE,  # CK+'s old random split; `random` is now image-level k-fold
}


# ----------------------------------------------------------------------------------------------
# Pure functions of (variables, raw faces).


def num_tta_views(shift: int = DEFAULT_TTA_SHIFT) -> int:
    return 10 if shift else 2


def tta_views(images: Array, shift: int = DEFAULT_TTA_SHIFT) -> Array:
    """Test-time augmentation views of a batch: [B, H, W, C] -> [V, B, H, W, C], same dtype.

    The images and their horizontal mirrors, each as is and shifted by `shift` pixels up, down,
    left and right (edge pixels repeated): V = 10, or V = 2 when `shift` is 0. View 0 is the input.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    height, width = images.shape[1], images.shape[2]
    s = int(shift)
    offsets = [(0, 0)] + ([(-s, 0), (s, 0), (0, -s), (0, s)] if s else [])
    views = []
    for base in (images, images[:, :, ::-1, :]):
        padded = jnp.pad(base, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
        for dy, dx in offsets:  # content moves down by dy and right by dx
            views.append(padded[:, s - dy:s - dy + height, s - dx:s - dx + width, :])
    return jnp.stack(views)


def logits(variables: Any, images: Array, *, model: nn.Module) -> Array:
    """Class logits of raw faces, pixel values 0-255 [B, 48, 48, 1] -> float32 [B, K]."""
    return model.apply(variables, augment.preprocess(images), train=False)


def probabilities(variables: Any, images: Array, *, model: nn.Module, tta: bool = False,
                  tta_shift: int = DEFAULT_TTA_SHIFT) -> Array:
    """Softmax class probabilities of raw faces, pixel values 0-255 [B, 48, 48, 1] -> [B, K].

    Each image (each view, with `tta`) is standardised by `augment.preprocess`; with `tta` the
    softmax outputs of the `tta_views` are averaged.
    """
    if not tta:
        return jax.nn.softmax(logits(variables, images, model=model), axis=-1)
    views = tta_views(images, tta_shift)  # [V, B, H, W, C]
    num_views, batch = views.shape[:2]
    flat = views.reshape((num_views * batch,) + views.shape[2:])
    probs = jax.nn.softmax(logits(variables, flat, model=model), axis=-1)
    return jnp.mean(probs.reshape(num_views, batch, -1), axis=0)


# ----------------------------------------------------------------------------------------------
# The model of a checkpoint.


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, *,
                conv_impl: str = "xla", dtype: str | None = None) -> nn.Module:
    """FERNet (Fig. 4) of a run's `model` config: the one place inference builds a model.

    `conv_impl` ("xla", "onednn" or "auto", see `fermsca.perf`) and `dtype` ("float32", ...;
    None keeps the run's) replace the config's: they change speed and precision, not parameters.
    """
    model_config = model_config.copy_and_resolve_references()
    with model_config.unlocked():
        model_config.conv_impl = conv_impl
        if dtype is not None:
            model_config.dtype = dtype
    return models.from_config(model_config, num_classes, **perf.building_blocks(model_config))


def upgrade_config(config: ml_collections.ConfigDict, where: str) -> ml_collections.ConfigDict:
    """A checkpoint's config without the `REMOVED_FIELDS` it holds at their remaining value.

    Raises CheckpointError naming `where` and the field when one holds another value.
    """
    config = config.copy_and_resolve_references()
    for name, value in REMOVED_FIELDS.items():
        *sections, field = name.split(".")
        parent = config
        for section in sections:
            parent = parent.get(section) if isinstance(parent, ml_collections.ConfigDict) else None
        if not isinstance(parent, ml_collections.ConfigDict) or field not in parent:
            continue
        if value is not ANY_VALUE and parent[field] != value:
            raise checkpoint.CheckpointError(
                f"{where}/meta: config.{name}={parent[field]!r}, an option this version of fermsca "
                f"no longer has (only {value!r} is supported); load it with the version that "
                "trained it")
        with parent.unlocked():
            del parent[field]
    return config


@dataclasses.dataclass(frozen=True)
class Face:
    """One face found in an image: its box (x, y, w, h) in pixels and its classes."""

    box: tuple[int, int, int, int]
    label: str
    score: float  # the probability of `label`
    probabilities: np.ndarray  # float32 [K], in `class_names` order


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A FERNet rebuilt from a checkpoint, with its weights: what `load` returns.

    `config` is the run's config; `model` computes on `conv_impl`'s convolutions. The methods take
    NumPy faces and return NumPy probabilities; their jitted functions are built once per setting.
    """

    model: nn.Module
    variables: dict
    class_names: tuple[str, ...]
    config: ml_collections.ConfigDict
    path: str  # the checkpoint's step folder
    step: int
    conv_impl: str = "xla"
    _jitted: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def rebuild(self, *, conv_impl: str | None = None, dtype: str | None = None) -> LoadedModel:
        """The same weights in a model on other convolutions or another compute dtype."""
        conv_impl = conv_impl or self.conv_impl
        model = build_model(self.config.model, len(self.class_names), conv_impl=conv_impl,
                            dtype=dtype)
        return dataclasses.replace(self, model=model, conv_impl=conv_impl)

    def classifier(self, *, tta: bool = False, tta_shift: int = DEFAULT_TTA_SHIFT,
                   batch_size: int = 64) -> Classifier:
        """The batched, jitted `Classifier` of this model (one per setting, kept)."""
        key = ("classifier", tta, tta_shift, batch_size)
        if key not in self._jitted:
            self._jitted[key] = Classifier(self.model, self.variables, self.class_names, tta=tta,
                                           tta_shift=tta_shift, batch_size=batch_size)
        return self._jitted[key]

    def classify(self, faces: np.ndarray, *, tta: bool = False,
                 batch_size: int = 64) -> np.ndarray:
        """Probabilities of faces, uint8 or float 0-255 [N, 48, 48(, 1)] -> float32 [N, K]."""
        return self.classifier(tta=tta, batch_size=batch_size)(faces)

    def logits(self, faces: np.ndarray) -> np.ndarray:
        """Logits of faces [N, 48, 48(, 1)] -> float32 [N, K], in one call (no batching)."""
        if "logits" not in self._jitted:
            self._jitted["logits"] = jax.jit(functools.partial(logits, model=self.model))
        return np.asarray(self._jitted["logits"](self.variables, _faces(faces)), np.float32)

    def classify_image(self, image: np.ndarray, *, detect: bool = True, margin: float = 0.0,
                       tta: bool = False) -> list[Face]:
        """The faces of one image, uint8 RGB [H, W, 3] or grayscale [H, W], largest first.

        With `detect`, faces are found by OpenCV's Haar cascade (`fermsca.faces`) and cropped
        square with `margin` (a fraction of the box side on every side); without, the image's
        centred square is the one face. An image without a face gives [].
        """
        boxes, crops = face_crops(image, detect=detect, margin=margin)
        if not boxes:
            return []
        probs = self.classify(np.stack(crops), tta=tta)
        found = []
        for box, p in zip(boxes, probs, strict=True):
            k = int(np.argmax(p))
            found.append(Face(tuple(int(v) for v in box), self.class_names[k], float(p[k]), p))
        return found


def load(path: str | None = None, *, conv_impl: str = "xla",
         dtype: str | None = None) -> LoadedModel:
    """Loads a checkpoint for inference: None (the released FER+ weights, `RELEASED_FERPLUS`), a
    training workdir (its best checkpoint, else its latest), a checkpoints/ or best/ folder (its
    newest step) or one step folder.

    The model is rebuilt from the checkpoint's own config (`build_model`) and computes on XLA's
    convolutions unless `conv_impl` says otherwise. Raises CheckpointError when the checkpoint is
    missing or unreadable, its metadata lacks the config or class names, or its weights do not fit
    its config.
    """
    path = RELEASED_FERPLUS if path is None else path
    variables, meta = checkpoint.load_checkpoint(path)
    directory, step = checkpoint.find_checkpoint(path)
    where = os.path.join(directory, str(step))
    try:
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        class_names = tuple(str(c) for c in meta["class_names"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise checkpoint.CheckpointError(
            f"{where}/meta: needs 'config' (JSON) and 'class_names' ({e})") from e
    config = upgrade_config(config, where)
    model = build_model(config.model, len(class_names), conv_impl=conv_impl, dtype=dtype)
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, FACE_SIZE, FACE_SIZE, 1), jnp.float32))
    problems = checkpoint.shape_mismatches(dict(expected), variables)
    if problems:
        raise checkpoint.CheckpointError(
            f"{where} does not match its own config:\n  " + "\n  ".join(problems))
    return LoadedModel(model, variables, class_names, config, where, step, conv_impl)


# ----------------------------------------------------------------------------------------------
# Batches of any size, and faces in whole images.


def _faces(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (FACE_SIZE, FACE_SIZE, 1):
        raise ValueError(f"expected faces [N, 48, 48, 1], got {images.shape}")
    return images


class Classifier:
    """Batched, jitted `probabilities` over all local devices.

    Calls take faces [N, 48, 48, 1] (or [N, 48, 48]) of any N; batches are padded to a fixed size
    so the function compiles once. `batch_size` counts model inputs: with TTA each image is
    `num_tta_views` inputs, so fewer images go into one batch.
    """

    def __init__(self, model: nn.Module, variables: Any, class_names: Sequence[str], *,
                 tta: bool = False, tta_shift: int = DEFAULT_TTA_SHIFT, batch_size: int = 64):
        self.class_names = tuple(class_names)
        self.tta = tta
        devices = jax.device_count()
        images_per_batch = max(1, batch_size // (num_tta_views(tta_shift) if tta else 1))
        self.batch_size = -(-images_per_batch // devices) * devices  # images, whole per device
        # Auto axes: the batch is split across devices, the model code needs no sharding types.
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self._variables = jax.device_put(variables, replicated)
        fn = functools.partial(probabilities, model=model, tta=tta, tta_shift=tta_shift)
        self._fn = jax.jit(fn, in_shardings=(replicated, self._batch_sharding),
                           out_shardings=replicated)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = _faces(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            real = len(batch)
            if real < self.batch_size:
                pad = np.zeros((self.batch_size - real,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            probs = self._fn(self._variables, jax.device_put(batch, self._batch_sharding))
            out.append(np.asarray(probs)[:real])
        if not out:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(out).astype(np.float32)


def face_crops(image: np.ndarray, *, detect: bool = True,
               margin: float = 0.0) -> tuple[list, list]:
    """(boxes, uint8 [48, 48] crops) of an RGB or grayscale image, largest face first; without
    `detect`, its centred square. Imports OpenCV (`fermsca.faces`)."""
    from fermsca import faces

    gray = faces.to_gray(image)
    if not detect:
        return [faces.center_box(gray.shape)], [faces.center_crop(gray)]
    boxes = faces.detect_faces(gray)
    return boxes, [faces.crop_face(gray, box, margin) for box in boxes]
