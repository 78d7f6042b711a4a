"""Max-pooling against flax.linen.max_pool (XLA's reduce-window and select-and-scatter) and brute force."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fermsca.perf import pooling


def flax_2x2(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def flax_3x3(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")


def sum_grad(pool, x):
    return jax.grad(lambda x: jnp.sum(pool(x).astype(jnp.float32)))(x)


def tied(key, shape):
    """Values on a coarse grid, so that most windows hold several equal maxima."""
    return jnp.round(jax.random.normal(key, shape) * 1.5) / 2


def brute_force_3x3_grad(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each output's gradient goes to the first maximum of its window, row-major."""
    ref = np.zeros_like(x)
    b, h, w, c = x.shape
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    win = [(u, v) for u in range(i - 1, i + 2) for v in range(j - 1, j + 2)
                           if 0 <= u < h and 0 <= v < w]
                    u, v = max(win, key=lambda p: x[n, p[0], p[1], ch])  # first of the maxima
                    ref[n, u, v, ch] += g[n, i, j, ch]
    return ref


def brute_force_2x2_grad(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    ref = np.zeros_like(x)
    b, h, w, c = x.shape
    for n in range(b):
        for ch in range(c):
            for i in range(h // 2):
                for j in range(w // 2):
                    block = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, ch]
                    u, v = np.unravel_index(np.argmax(block), (2, 2))  # argmax: the first maximum
                    ref[n, 2 * i + u, 2 * j + v, ch] = g[n, i, j, ch]
    return ref


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 7, 5, 2), (3, 4, 4, 1)])
def test_2x2_values_and_gradient_equal_flax_and_brute_force_with_ties(shape):
    x = tied(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    np.testing.assert_array_equal(pooling.max_pool_2x2(x), flax_2x2(x))
    np.testing.assert_array_equal(pooling.reshape_max_2x2(x), flax_2x2(x))
    grad = jax.grad(lambda x: jnp.sum(pooling.max_pool_2x2(x) * g))(x)
    np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(flax_2x2(x) * g))(x))
    np.testing.assert_array_equal(grad, brute_force_2x2_grad(np.asarray(x), np.asarray(g)))
    assert grad.shape == x.shape  # odd sizes: the dropped row/column gets a zero gradient


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2), (1, 1, 1, 2)])
def test_3x3_values_and_gradient_equal_flax_and_brute_force_with_ties(shape):
    x = tied(jax.random.key(2), shape)
    # Integer-valued output gradients: sums of them are exact in any order, so equality is exact.
    g = jnp.round(jax.random.normal(jax.random.key(3), shape) * 4)
    np.testing.assert_array_equal(pooling.max_pool_3x3_same(x), flax_3x3(x))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pooling.max_pool_3x3_same(x) * g)))(x)
    np.testing.assert_array_equal(grad, jax.grad(lambda x: jnp.sum(flax_3x3(x) * g))(x))
    np.testing.assert_array_equal(grad, brute_force_3x3_grad(np.asarray(x), np.asarray(g)))


def test_pools_keep_dtype_and_handle_infinities():
    x = tied(jax.random.key(4), (2, 4, 6, 3)).astype(jnp.bfloat16)
    for pool, ref in ((pooling.max_pool_2x2, flax_2x2), (pooling.max_pool_3x3_same, flax_3x3)):
        y = pool(x)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(y, ref(x))
        grad = sum_grad(pool, x)
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_array_equal(grad, sum_grad(ref, x))
    # Windows of -inf ties with the padding: the gradient goes where XLA's sends it.
    x = jnp.full((1, 3, 2, 1), -jnp.inf).at[0, 2, 1, 0].set(1.0)
    for pool, ref in ((pooling.max_pool_2x2, flax_2x2), (pooling.max_pool_3x3_same, flax_3x3)):
        np.testing.assert_array_equal(sum_grad(pool, x), sum_grad(ref, x))


def test_pools_under_vmap_jit_and_symbolic_batch():
    x = tied(jax.random.key(5), (3, 2, 6, 6, 4))
    batched = jax.vmap(lambda x: jax.grad(lambda x: pooling.max_pool_3x3_same(x).sum())(x))(x)
    looped = jnp.stack([jax.grad(lambda x: flax_3x3(x).sum())(xi) for xi in x])
    np.testing.assert_array_equal(batched, looped)
    b, = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 6, 6, 4), jnp.float32)
    for pool in (pooling.max_pool_2x2, pooling.max_pool_3x3_same):
        exp = jax.export.export(jax.jit(pool))(spec)
        np.testing.assert_array_equal(exp.call(x[0]), pool(x[0]))


def test_max_pool_is_a_drop_in_for_flax_max_pool():
    """`pooling.max_pool` (FERNet's `pool` block) equals nn.max_pool, values and gradients, for
    FERNet's two pools and anything else it hands through."""
    x = jax.random.normal(jax.random.key(3), (2, 7, 6, 3))
    for args in (((2, 2), (2, 2), "VALID"), ((3, 3), (1, 1), "SAME"), ((2, 2), None, "VALID"),
                 ((3, 3), (2, 2), "SAME")):
        np.testing.assert_array_equal(pooling.max_pool(x, *args), nn.max_pool(x, *args))
        g = jax.grad(lambda x, args=args: jnp.sum(jnp.sin(pooling.max_pool(x, *args))))(x)
        r = jax.grad(lambda x, args=args: jnp.sum(jnp.sin(nn.max_pool(x, *args))))(x)
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
