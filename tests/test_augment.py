"""Augmentation geometry and standardisation pinned against plain NumPy references."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fermsca import augment

SIZE = 48
CENTRE = (SIZE - 1) / 2


def _blob(row: float, col: float, sigma: float = 1.5) -> np.ndarray:
    """A Gaussian spot centred at (row, col), [1, SIZE, SIZE, 1] float32."""
    r, c = np.mgrid[:SIZE, :SIZE]
    spot = np.exp(-((r - row) ** 2 + (c - col) ** 2) / (2 * sigma**2))
    return spot[None, :, :, None].astype(np.float32)


def _centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted (row, col) of a [1, H, W, 1] image."""
    w = np.asarray(image)[0, :, :, 0].astype(np.float64)
    r, c = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(w * r).sum(), (w * c).sum()]) / w.sum()


def _warp(image: np.ndarray, shift, angle_deg, scale) -> np.ndarray:
    m = augment.affine_matrix(jnp.asarray(shift, jnp.float32), angle_deg, scale, (SIZE, SIZE))
    return np.asarray(augment.apply_affine(image, m[None]))


def _reference_matrix(shift, angle_deg, scale, size) -> np.ndarray:
    """Sampling matrix as the inverse of the forward transform, built step by step."""

    def translate(t):
        m = np.eye(3)
        m[:2, 2] = t
        return m

    theta = np.deg2rad(angle_deg)
    rotate = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    zoom = np.diag([*np.broadcast_to(scale, (2,)), 1.0])
    centre = (np.asarray(size) - 1) / 2
    forward = translate(centre + np.asarray(shift)) @ rotate @ zoom @ translate(-centre)
    return np.linalg.inv(forward)


def _reference_resample(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Bilinear pull resampling of one [H, W, C] image, edge pixels repeated."""
    h, w = image.shape[:2]
    rows, cols = np.mgrid[:h, :w]
    src = matrix @ np.stack([rows.ravel(), cols.ravel(), np.ones(h * w)])
    r, c = src[0], src[1]
    r0, c0 = np.floor(r), np.floor(c)
    fr, fc = r - r0, c - c0

    def at(ri, ci):
        return image[np.clip(ri, 0, h - 1).astype(int), np.clip(ci, 0, w - 1).astype(int)]

    out = (
        at(r0, c0) * ((1 - fr) * (1 - fc))[:, None]
        + at(r0, c0 + 1) * ((1 - fr) * fc)[:, None]
        + at(r0 + 1, c0) * (fr * (1 - fc))[:, None]
        + at(r0 + 1, c0 + 1) * (fr * fc)[:, None]
    )
    return out.reshape(image.shape)


def test_identity_reproduces_input_exactly():
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    m = augment.affine_matrix(jnp.zeros(2), 0.0, 1.0, (SIZE, SIZE))
    out = augment.apply_affine(images, jnp.stack([m] * 3))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), images.astype(np.float32))


def test_integer_shift_moves_a_dot_exactly():
    image = np.zeros((1, SIZE, SIZE, 1), np.float32)
    image[0, 10, 20, 0] = 1.0
    out = _warp(image, (2.0, -3.0), 0.0, 1.0)  # down 2, left 3
    expected = np.zeros_like(image)
    expected[0, 12, 17, 0] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_positive_rotation_is_counter_clockwise():
    # A spot 12 px right of the centre turns by +10 degrees: up (smaller row) and slightly left.
    radius, theta = 12.0, np.deg2rad(10.0)
    out = _warp(_blob(CENTRE, CENTRE + radius), (0.0, 0.0), 10.0, 1.0)
    expected = (CENTRE - radius * np.sin(theta), CENTRE + radius * np.cos(theta))
    np.testing.assert_allclose(_centroid(out), expected, atol=0.02)


def test_zoom_moves_points_away_from_the_centre():
    offset = np.array([5.0, -8.0])
    out = _warp(_blob(*(CENTRE + offset)), (0.0, 0.0), 0.0, 1.3)
    np.testing.assert_allclose(_centroid(out), CENTRE + 1.3 * offset, atol=0.02)


@pytest.mark.parametrize("seed", range(4))
def test_matrix_matches_reference_composition(seed):
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-3, 3, 2)
    angle = rng.uniform(-30, 30)
    scale = rng.uniform(0.6, 1.5, 2)
    size = (SIZE, 40)
    got = augment.affine_matrix(jnp.asarray(shift), angle, jnp.asarray(scale), size)
    np.testing.assert_allclose(got, _reference_matrix(shift, angle, scale, size), atol=1e-5)


def test_resampling_matches_numpy_bilinear_reference():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 2)).astype(np.float32)
    params = [((2.2, -1.7), 8.0, 1.25), ((-2.4, 0.9), -9.5, (0.75, 1.2))]
    matrices = [
        augment.affine_matrix(jnp.asarray(s), a, jnp.asarray(z), (SIZE, SIZE)) for s, a, z in params
    ]
    got = np.asarray(augment.apply_affine(images, jnp.stack(matrices)))
    for i, m in enumerate(matrices):
        want = _reference_resample(images[i].astype(np.float64), np.asarray(m, np.float64))
        np.testing.assert_allclose(got[i], want, atol=1e-2)


@pytest.mark.parametrize("isotropic", [True, False])
def test_random_parameters_stay_within_bounds(isotropic):
    shift, angle, scale = augment.sample_affine_params(
        jax.random.key(0),
        20000,
        (SIZE, 40),
        max_shift=0.05,
        max_rotation=10.0,
        zoom_range=0.3,
        isotropic_zoom=isotropic,
    )
    shift, angle, scale = map(np.asarray, (shift, angle, scale))
    for axis, extent in enumerate((0.05 * SIZE, 0.05 * 40)):
        assert np.abs(shift[:, axis]).max() <= extent
        assert np.abs(shift[:, axis]).max() > 0.98 * extent  # the whole range is used
    assert np.abs(angle).max() <= 10.0 and np.abs(angle).max() > 9.9
    z = 1.0 / scale
    assert z.min() >= 0.7 - 1e-6 and z.max() <= 1.3 + 1e-6
    assert z.min() < 0.71 and z.max() > 1.29
    assert np.abs(np.mean(z) - 1.0) < 0.01
    assert np.array_equal(scale[:, 0], scale[:, 1]) == isotropic


def test_random_affine_is_deterministic_jittable_and_random_across_keys():
    images = np.random.default_rng(2).integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8)
    key = jax.random.key(3)
    eager = augment.random_affine(key, images)
    assert eager.shape == images.shape and eager.dtype == jnp.float32
    np.testing.assert_array_equal(eager, augment.random_affine(key, images))
    np.testing.assert_allclose(jax.jit(augment.random_affine)(key, images), eager, atol=1e-3)
    other = augment.random_affine(jax.random.key(4), images)
    assert not np.allclose(other, eager)
    # Different images of one batch get different transforms.
    same = np.repeat(images[:1], 4, axis=0)
    out = np.asarray(augment.random_affine(key, same))
    assert not np.allclose(out[0], out[1])


def test_standardize_matches_numpy():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    images[2] = 77  # constant image: std is floored at 1 / sqrt(num_pixels)
    x = images.astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), 1 / np.sqrt(SIZE * SIZE))
    got = augment.standardize(images)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (x - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_array_equal(augment.preprocess(images), got)


def test_random_flip_mirrors_about_half_the_images():
    images = np.random.default_rng(6).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    key = jax.random.key(7)
    out = np.asarray(augment.random_flip(key, images))
    np.testing.assert_array_equal(out, augment.random_flip(key, images))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.all(flipped ^ kept)
    assert 70 < flipped.sum() < 130


@dataclasses.dataclass
class _Fields:
    shift: float = 0.0
    rotation: float = 0.0
    zoom: float = 0.0
    flip: bool = False


def test_augment_disabled_equals_preprocess():
    images = np.random.default_rng(8).integers(0, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
    out = augment.augment(jax.random.key(0), images, _Fields())
    np.testing.assert_array_equal(out, augment.preprocess(images))


def test_augment_with_paper_config_under_jit():
    config = ml_collections.ConfigDict(dict(shift=0.05, rotation=10.0, zoom=0.3, flip=True,
                                          isotropic_zoom=True))
    images = np.random.default_rng(9).integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8)
    step = jax.jit(lambda key, x: augment.augment(key, x, config))
    out = np.asarray(step(jax.random.key(1), images))
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    assert not np.allclose(out, augment.preprocess(images))
    np.testing.assert_array_equal(out, step(jax.random.key(1), images))


def test_mixup_blends_images_and_targets_with_one_weight_and_a_permutation():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((8, SIZE, SIZE, 1)).astype(np.float32)
    targets = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)]
    key = jax.random.key(5)
    mixed, mixed_targets = jax.jit(augment.mixup, static_argnums=3)(key, images, targets, 0.4)
    lam, perm = augment.mixup_params(key, 8, 0.4)
    lam, perm = float(lam), np.asarray(perm)
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == list(range(8))
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[perm], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[perm], rtol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    # lambda ~ Beta(a, a): symmetric about 1/2, and near 0 or 1 for a small a.
    lams = np.array([float(augment.mixup_params(jax.random.key(i), 8, 0.2)[0]) for i in range(400)])
    assert abs(lams.mean() - 0.5) < 0.06
    assert np.mean((lams < 0.1) | (lams > 0.9)) > 0.4
