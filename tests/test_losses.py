"""Losses against plain NumPy references: eq. (4) and soft-target cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fermsca import losses


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_cosine_loss(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Eq. (4) with y_pred = softmax(logits), one value per row."""
    y_pred = np_softmax(logits.astype(np.float64))
    y_true = targets.astype(np.float64)
    dot = np.sum(y_true * y_pred, axis=-1)
    norms = np.sqrt(np.sum(y_true**2, axis=-1)) * np.sqrt(np.sum(y_pred**2, axis=-1))
    return -dot / norms


def np_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.sum(targets * log_probs, axis=-1)


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=2.0, size=(6, 8)).astype(np.float32)


def one_hot(labels, k: int = 8) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[np.asarray(labels)]


def soft_targets(batch: int = 6, k: int = 8) -> np.ndarray:
    votes = np.random.default_rng(1).integers(0, 5, size=(batch, k)).astype(np.float32)
    votes[:, 0] += 1.0  # every row has at least one vote
    return votes / votes.sum(axis=-1, keepdims=True)


def test_cosine_matches_eq4_one_hot(logits):
    targets = one_hot([0, 1, 2, 3, 7, 5])
    got = losses.cosine_similarity_loss(jnp.asarray(logits), jnp.asarray(targets))
    assert got.shape == (6,)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_cosine_loss(logits, targets), rtol=1e-5, atol=1e-6)


def test_cosine_matches_eq4_soft_targets(logits):
    targets = soft_targets()
    got = losses.cosine_similarity_loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, np_cosine_loss(logits, targets), rtol=1e-5, atol=1e-6)
    # Eq. (4) normalises y_true: raw vote counts give the same loss as the distribution.
    scaled = losses.cosine_similarity_loss(jnp.asarray(logits), jnp.asarray(targets * 10.0))
    np.testing.assert_allclose(scaled, got, rtol=1e-5, atol=1e-6)


def test_cosine_range_and_perfect_prediction():
    targets = one_hot([2, 4])
    confident = np.full((2, 8), -20.0, np.float32)
    confident[0, 2] = confident[1, 4] = 20.0
    got = losses.cosine_similarity_loss(jnp.asarray(confident), jnp.asarray(targets))
    np.testing.assert_allclose(got, [-1.0, -1.0], atol=1e-6)
    # Confidently wrong: the prediction is orthogonal to the target, loss -> 0.
    wrong = losses.cosine_similarity_loss(jnp.asarray(confident), jnp.asarray(one_hot([0, 0])))
    np.testing.assert_allclose(wrong, [0.0, 0.0], atol=1e-6)
    # Uniform prediction against a one-hot target: cos = (1/K) / (1 * sqrt(K)/K) = 1/sqrt(K).
    uniform = losses.cosine_similarity_loss(jnp.zeros((1, 8)), jnp.asarray(one_hot([3])))
    np.testing.assert_allclose(uniform, [-1.0 / np.sqrt(8.0)], rtol=1e-6)


@pytest.mark.parametrize("loss_name", ["cosine", "cross_entropy"])
def test_weights_multiply_per_example_loss(logits, loss_name):
    fn = losses.get(loss_name)
    targets = jnp.asarray(soft_targets())
    weights = jnp.asarray([1.0, 0.0, 2.5, 1.0, 0.5, 0.0])
    plain = fn(jnp.asarray(logits), targets)
    weighted = fn(jnp.asarray(logits), targets, weights)
    assert weighted.shape == (6,)
    np.testing.assert_allclose(weighted, np.asarray(plain) * np.asarray(weights), rtol=1e-6)


def test_cosine_all_zero_target_is_finite_with_finite_gradient(logits):
    targets = one_hot([0, 1, 2, 3, 4, 5])
    targets[2] = 0.0
    got = losses.cosine_similarity_loss(jnp.asarray(logits), jnp.asarray(targets))
    assert np.all(np.isfinite(got))
    assert float(got[2]) == 0.0

    def total(z):
        return jnp.sum(losses.cosine_similarity_loss(z, jnp.asarray(targets)))

    grad = jax.grad(total)(jnp.asarray(logits))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[2], np.zeros(8))
    assert np.abs(grad[0]).sum() > 0


@pytest.mark.parametrize("loss_name", ["cosine", "cross_entropy"])
def test_masked_example_has_zero_gradient(logits, loss_name):
    fn = losses.get(loss_name)
    targets = jnp.asarray(soft_targets())
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])

    def mean_loss(z):
        return jnp.sum(fn(z, targets, mask)) / jnp.sum(mask)

    grad = np.asarray(jax.grad(mean_loss)(jnp.asarray(logits)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[[2, 4]], np.zeros((2, 8)))
    assert np.all(np.abs(grad[[0, 1, 3, 5]]).sum(axis=-1) > 0)


def test_cross_entropy_matches_numpy_soft_targets(logits):
    targets = soft_targets()
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, np_cross_entropy(logits, targets), rtol=1e-5, atol=1e-6)
    # One-hot targets reduce to -log p_label.
    labels = np.array([0, 1, 2, 3, 7, 5])
    hard = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(one_hot(labels)))
    expected = -np.log(np_softmax(logits.astype(np.float64))[np.arange(6), labels])
    np.testing.assert_allclose(hard, expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_stable_for_large_logits():
    z = jnp.asarray([[1000.0, 0.0, -1000.0]])
    got = losses.cross_entropy(z, jnp.asarray([[0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(got, [1000.0], rtol=1e-6)


def test_get():
    assert losses.get("cosine") is losses.cosine_similarity_loss
    assert losses.get("cross_entropy") is losses.cross_entropy
    with pytest.raises(ValueError, match="hinge"):
        losses.get("hinge")


def test_class_weights_by_hand():
    # counts 60 / 30 / 10 / 0: N = 100, K = 4; inverse frequency N / (K n) = 5/12, 5/6, 5/2, (absent)
    w = losses.class_weights([60, 30, 10, 0], power=1.0)
    scale = 100 / (60 * 5 / 12 + 30 * 5 / 6 + 10 * 5 / 2)  # mean weight over the examples is 1
    np.testing.assert_allclose(w, np.array([5 / 12, 5 / 6, 5 / 2, 0]) * scale, rtol=1e-6)
    np.testing.assert_allclose(np.dot([60, 30, 10, 0], w) / 100, 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.class_weights([60, 30, 10], power=0.0), 1.0, rtol=1e-6)
    half = losses.class_weights([60, 30, 10], power=0.5)
    np.testing.assert_allclose(half[2] / half[0], np.sqrt(6.0), rtol=1e-6)  # sqrt(60 / 10)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        losses.class_weights([0, 0], power=1.0)
