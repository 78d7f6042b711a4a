"""Losses: the paper's cosine-similarity loss (eq. 4) and soft-target cross-entropy.

Both take logits [B, K] and a target distribution [B, K] (one-hot, or soft FER+ vote distributions) and
return one loss per example [B]. Optional `weights` [B] (example weights or a 0/1 validity mask) scale
each example's loss. All-zero or masked targets give finite values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
    # maximum() keeps the value and the gradient finite for an all-zero vector.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS))


def cosine_similarity_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Eq. (4): L = -<y_true, y_pred> / (||y_true|| ||y_pred||), with y_pred = softmax(logits).

    Returns [B]; ranges over [-1, 0] for non-negative targets (-1 when the prediction points exactly
    along the target).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    targets = targets.astype(jnp.float32)
    loss = -jnp.sum(_l2_normalize(targets) * _l2_normalize(probs), axis=-1)
    return loss if weights is None else loss * weights


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Soft-target cross-entropy -sum_k y_k log softmax(logits)_k, per example [B]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
    return loss if weights is None else loss * weights


LOSSES = {"cosine": cosine_similarity_loss, "cross_entropy": cross_entropy}


def class_weights(counts, power: float) -> np.ndarray:
    """Per-class loss weights (N / (K n_k)) ** power for the class counts n_k of a training set
    (beyond the paper: 1 is inverse frequency, 0.5 its square root, 0 every weight 1), scaled so
    that the mean weight over the training examples is 1. An absent class gets weight 0."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"class counts must be non-negative with a positive sum, got {counts}")
    n, k = counts.sum(), len(counts)
    weights = np.where(counts > 0, (n / (k * np.maximum(counts, 1e-12))) ** power, 0.0)
    return (weights * n / (counts @ weights)).astype(np.float32)


def get(name: str):
    """The loss named by `config.loss`: 'cosine' (the paper, eq. 4) or 'cross_entropy'."""
    if name not in LOSSES:
        raise ValueError(f"config.loss={name!r}: expected one of {sorted(LOSSES)}")
    return LOSSES[name]
