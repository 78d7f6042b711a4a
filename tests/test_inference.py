"""The inference API: the released weights' pinned logits, loading, TTA, batching, whole images."""

import functools
import hashlib
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import tiny_run

from fermsca import checkpoint, inference

CLASS_NAMES = tiny_run.CLASS_NAMES
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Logits of the released FER+ weights (step 9810) on `faces_batch(8)`, computed by the code of commit
# bfca256 (inference.load, XLA convolutions): the guard that the released weights keep their behaviour.
RELEASED_LOGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                               "released_ferplus_logits.npz")
# The same for the released CK+ weights, computed by commit 5fe5c58's inference.load (XLA convolutions).
RELEASED_CKPLUS_LOGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                      "released_ckplus_logits.npz")
CKPLUS_CLASS_NAMES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")


def onednn_unavailable() -> str | None:
    from fermsca.perf import onednn_conv

    return onednn_conv.unavailable_reason()


@pytest.fixture(scope="module")
def released():
    return inference.load()


@pytest.fixture(scope="module")
def loaded(workdir):
    return inference.load(workdir)


def faces_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


def jitted_probabilities(model, variables, images, **kwargs) -> np.ndarray:
    fn = jax.jit(functools.partial(inference.probabilities, model=model, **kwargs))
    return np.asarray(fn(variables, images))


# ---------------------------------------------------------------------------------------------
# The released weights


@pytest.mark.parametrize("conv_impl", ["xla", "onednn"])
def test_released_weights_give_the_pinned_logits(released, conv_impl):
    if conv_impl == "onednn" and onednn_unavailable():
        pytest.skip(f"oneDNN convolutions unavailable: {onednn_unavailable()}")
    pinned = np.load(RELEASED_LOGITS)
    images = faces_batch(8)  # uint8 noise from default_rng(0); the model standardises it
    assert hashlib.sha256(images.tobytes()).hexdigest() == str(pinned["images_sha256"]), (
        "NumPy's default_rng(0) stream changed: the pinned inputs are not these")
    model = released.rebuild(conv_impl=conv_impl)
    assert model.step == int(pinned["step"]) and model.conv_impl == conv_impl
    assert model.class_names == tuple(CLASS_NAMES)
    got = model.logits(images)
    assert got.dtype == np.float32
    # oneDNN sums the convolutions in another order than XLA. Through the network that moves the
    # logits (up to 10 in size) by about 1e-5 (1.04e-5 seen), so 1e-5 of each logit's size is added.
    np.testing.assert_allclose(got, pinned["logits"], rtol=1e-5, atol=1e-5)


def test_released_weights_are_package_data():
    assert inference.RELEASED_FERPLUS == os.path.join(REPO, "fermsca", "released", "ferplus")
    assert checkpoint.find_checkpoint(inference.RELEASED_FERPLUS)[1] == 9810
    assert inference.RELEASED_CKPLUS == os.path.join(REPO, "fermsca", "released", "ckplus")
    assert checkpoint.find_checkpoint(inference.RELEASED_CKPLUS)[1] == 28000


def test_released_ckplus_weights_give_the_pinned_logits():
    """The CK+ model trained on every CK+48 image (protocol 'all', 200 epochs at the paper's
    settings): 7 classes, its config says how it was trained, and its logits are pinned."""
    pinned = np.load(RELEASED_CKPLUS_LOGITS)
    images = faces_batch(8)
    assert hashlib.sha256(images.tobytes()).hexdigest() == str(pinned["images_sha256"])
    model = inference.load(inference.RELEASED_CKPLUS)
    assert model.step == int(pinned["step"]) == 28000 and model.class_names == CKPLUS_CLASS_NAMES
    assert model.config.dataset.name == "ckplus" and model.config.dataset.protocol == "all"
    assert (model.config.num_epochs, model.config.batch_size, model.config.loss) == (200, 7, "cosine")
    np.testing.assert_allclose(model.logits(images), pinned["logits"], rtol=0, atol=1e-5)


def test_importing_the_api_leaves_opencv_out():
    """Loading and classifying arrays needs no OpenCV; evaluate and export do not import predict."""
    code = ("import sys; import fermsca.inference, fermsca.evaluate, fermsca.export; "
            "print(sorted({'cv2', 'fermsca.faces', 'fermsca.predict'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# TTA


def reference_view(base: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved down by dy and right by dx, edge pixels repeated (NumPy, by index)."""
    h, w = base.shape[1:3]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return base[:, rows][:, :, cols]


def test_tta_views_are_flips_and_shifts():
    images = faces_batch(3)[:, :8, :10]  # non-square, to catch swapped axes
    views = np.asarray(jax.jit(inference.tta_views, static_argnums=1)(images, 2))
    assert views.shape == (10, 3, 8, 10, 1) and views.dtype == np.uint8
    offsets = [(0, 0), (-2, 0), (2, 0), (0, -2), (0, 2)]
    expected = [reference_view(base, dy, dx)
                for base in (images, images[:, :, ::-1]) for dy, dx in offsets]
    np.testing.assert_array_equal(views, np.stack(expected))
    no_shift = np.asarray(inference.tta_views(images, 0))
    np.testing.assert_array_equal(no_shift, np.stack([images, images[:, :, ::-1]]))


def test_tta_averages_softmax_over_views(tiny_model):
    _, model, variables = tiny_model
    images = faces_batch(4)
    with_tta = jax.jit(functools.partial(inference.probabilities, model=model, tta=True))
    without = jax.jit(functools.partial(inference.probabilities, model=model))
    tta = np.asarray(with_tta(variables, images))
    views = np.asarray(inference.tta_views(images))
    per_view = [np.asarray(without(variables, v)) for v in views]
    np.testing.assert_allclose(tta, np.mean(per_view, axis=0), atol=1e-6)
    plain = np.asarray(without(variables, images))
    assert np.abs(tta - plain).max() > 1e-4  # the views do differ
    np.testing.assert_allclose(tta.sum(-1), 1.0, atol=1e-5)


class MirrorSymmetric(nn.Module):
    """A FERNet made invariant to horizontal flips: logits(x) + logits(mirror x)."""

    net: nn.Module

    def __call__(self, x, train=False):
        return self.net(x, train) + self.net(x[:, :, ::-1], train)


def test_tta_of_a_flip_invariant_model_equals_no_tta(tiny_model):
    _, model, variables = tiny_model
    symmetric = MirrorSymmetric(model)
    wrapped = {"params": {"net": variables["params"]},
               "batch_stats": {"net": variables["batch_stats"]}}
    images = faces_batch(5, seed=1)
    plain = jax.jit(functools.partial(inference.probabilities, model=symmetric))(wrapped, images)
    tta = jax.jit(functools.partial(inference.probabilities, model=symmetric, tta=True,
                                    tta_shift=0))(wrapped, images)
    np.testing.assert_allclose(np.asarray(tta), np.asarray(plain), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loading and the batched classifier


def test_classifier_pads_batches_and_matches_the_pure_function(tiny_model):
    _, model, variables = tiny_model
    images = faces_batch(10, seed=2)
    classifier = inference.Classifier(model, variables, CLASS_NAMES, batch_size=4)
    expected = jitted_probabilities(model, variables, images)
    np.testing.assert_allclose(classifier(images), expected, atol=1e-6)
    np.testing.assert_allclose(classifier(images[:, :, :, 0]), expected, atol=1e-6)
    assert classifier(images[:0]).shape == (0, 8)
    # With TTA a batch holds batch_size model inputs: 10 views per image.
    assert inference.Classifier(model, variables, CLASS_NAMES, tta=True,
                                batch_size=40).batch_size == 4
    with pytest.raises(ValueError, match="48, 48, 1"):
        classifier(np.zeros((2, 32, 32, 1), np.uint8))


def test_load_rebuilds_the_checkpoint(loaded, tiny_model):
    _, _, variables = tiny_model
    assert loaded.class_names == tuple(CLASS_NAMES)
    assert loaded.step == 0 and loaded.path.endswith(os.path.join("best", "0"))
    assert tuple(loaded.config.model.widths) == (8, 16, 16)
    assert loaded.conv_impl == "xla" and loaded.config.model.conv_impl == "auto"  # the run's
    kernel = loaded.variables["params"]["classifier"]["kernel"]
    np.testing.assert_array_equal(kernel, variables["params"]["classifier"]["kernel"])
    step_folder = inference.load(loaded.path)
    assert step_folder.path == loaded.path and step_folder.step == 0


def test_load_refuses_weights_that_do_not_fit_the_config(tmp_path):
    config = tiny_run.tiny_config()
    other = tiny_run.tiny_config()
    other.model.widths = (8, 16, 32)
    other_model = inference.build_model(other.model, len(CLASS_NAMES))
    tiny_run.save_run_checkpoint(str(tmp_path), config,
                                 tiny_run.random_variables(other_model, seed=1))
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        inference.load(str(tmp_path))


def test_load_says_what_is_missing(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        inference.load(str(tmp_path / "none"))


def test_classify_takes_uint8_or_float_faces_and_keeps_its_classifiers(loaded):
    images = faces_batch(6, seed=4)
    logits = loaded.logits(images)
    np.testing.assert_allclose(loaded.logits(images[..., 0].astype(np.float32)), logits, atol=1e-5)
    np.testing.assert_allclose(loaded.classify(images), jax.nn.softmax(logits), atol=1e-6)
    assert loaded.classifier() is loaded.classifier(tta=False, batch_size=64)


# ---------------------------------------------------------------------------------------------
# Old checkpoints: fields since removed from the config


def save_with_model_field(path, name: str, value) -> str:
    config = tiny_run.tiny_config()
    config.model.unlock()
    config.model[name] = value
    model = inference.build_model(tiny_run.tiny_config().model, len(CLASS_NAMES))
    return tiny_run.save_run_checkpoint(str(path), config, tiny_run.random_variables(model, 2))


def test_old_checkpoints_load_without_removed_fields_at_their_old_default(tmp_path):
    loaded = inference.load(save_with_model_field(tmp_path, "fuse_projection", False))
    assert "fuse_projection" not in loaded.config.model
    assert tuple(loaded.config.model.widths) == (8, 16, 16)
    old = tiny_run.tiny_config()
    with old.dataset.unlocked():
        old.dataset.test_fraction = 0.25  # a data field: any value is dropped
    assert "test_fraction" not in inference.upgrade_config(old, "runs/x/3").dataset


def test_removed_fields_with_another_value_are_refused_by_name():
    config = tiny_run.tiny_config()
    config.model.unlock()
    config.model.fuse_projection = True
    with pytest.raises(checkpoint.CheckpointError, match=r"^runs/x/3/meta: config.model."
                       r"fuse_projection=True, an option .* no longer has"):
        inference.upgrade_config(config, "runs/x/3")


# ---------------------------------------------------------------------------------------------
# Whole images


def test_classify_image_without_detection_is_its_centred_square(loaded):
    from fermsca import faces

    rgb = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    (face,) = loaded.classify_image(rgb, detect=False)
    assert face.box == (8, 0, 64, 64)
    expected = loaded.classify(faces.center_crop(faces.to_gray(rgb))[None])[0]
    np.testing.assert_allclose(face.probabilities, expected, atol=1e-6)
    assert face.label == CLASS_NAMES[int(np.argmax(expected))]
    assert face.score == pytest.approx(float(expected.max()))
    assert loaded.classify_image(np.full((120, 160, 3), 90, np.uint8)) == []  # no face found
