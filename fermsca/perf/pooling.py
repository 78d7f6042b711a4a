"""Max-pooling for FERNet (Fig. 4's 2x2 pools, Fig. 2's 3x3 pool branch) with a cheap backward pass.

`max_pool` is a drop-in for `flax.linen.max_pool` (FERNet's `pool` building block): its two pools
run as `max_pool_2x2` and `max_pool_3x3_same`, anything else as `nn.max_pool`. Those two compute
exactly what `flax.linen.max_pool` computes, values and gradients: the gradient
of each window goes to its first maximum in row-major window order, as XLA's select-and-scatter does.
They differ in how: the forward pass also records, as one int8 per output, which window position held
the maximum, and the backward pass routes each output gradient by that index with elementwise
operations, one pass over the gradient. XLA's CPU select-and-scatter, and the gradient JAX derives for
a `max` reduction (compare, count ties, divide), take several passes over the activations
(`python -m experiments.perf.perf_levers`: `argmax_pools`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def max_pool(inputs: jax.Array, window_shape: tuple[int, ...], strides: tuple[int, ...] | None = None,
             padding: str = "VALID") -> jax.Array:
    """`nn.max_pool` with the same arguments and results, fast for FERNet's two NHWC pools."""
    strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
    if inputs.ndim == 4 and tuple(window_shape) == (2, 2) and strides == (2, 2) and padding == "VALID":
        return max_pool_2x2(inputs)
    if inputs.ndim == 4 and tuple(window_shape) == (3, 3) and strides == (1, 1) and padding == "SAME":
        return max_pool_3x3_same(inputs)
    return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2, VALID, of NHWC `x`: `nn.max_pool(x, (2, 2), strides=(2, 2))`."""
    return _pool_2x2(x, (x.shape[1], x.shape[2]))


def _quadrants(x: jax.Array) -> list[jax.Array]:
    """The four positions of every 2x2 window, row-major: [B, H//2, W//2, C] each."""
    b, h, w, c = x.shape
    x = lax.slice(x, (0, 0, 0, 0), (b, h // 2 * 2, w // 2 * 2, c))  # VALID drops an odd row/column
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    # lax.index_in_dim (static slices), not NumPy indexing, which becomes a gather under a symbolic
    # batch size.
    rows = [lax.index_in_dim(x, i, axis=2, keepdims=False) for i in (0, 1)]
    return [lax.index_in_dim(r, j, axis=3, keepdims=False) for r in rows for j in (0, 1)]


def reshape_max_2x2(x: jax.Array) -> jax.Array:
    """The same 2x2 pooling as a reshape and a `max`, differentiated by JAX's rule for `max`."""
    b, h, w, c = x.shape
    x = lax.slice(x, (0, 0, 0, 0), (b, h // 2 * 2, w // 2 * 2, c))
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool_2x2(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    # Without differentiation (inference, export): the reshape-max, which every converter takes
    # (TFLite cannot slice the 6-D view `_quadrants` takes under a symbolic batch size).
    return reshape_max_2x2(x)


def _pool_2x2_fwd(x, hw):
    q = _quadrants(x)
    m = jnp.maximum(jnp.maximum(q[0], q[1]), jnp.maximum(q[2], q[3]))
    first = jnp.where(q[0] == m, 0, jnp.where(q[1] == m, 1, jnp.where(q[2] == m, 2, 3)))
    return m, first.astype(jnp.int8)


def _pool_2x2_bwd(hw, first, g):
    b, h2, w2, c = g.shape
    shape = (1, 1, 2, 1, 2, 1)
    position = (lax.broadcasted_iota(jnp.int8, shape, 2) * 2 + lax.broadcasted_iota(jnp.int8, shape, 4))
    dx = jnp.where(lax.expand_dims(first, (2, 4)) == position, lax.expand_dims(g, (2, 4)),
                   jnp.zeros((), g.dtype))
    dx = dx.reshape(b, 2 * h2, 2 * w2, c)
    h, w = hw
    if (h, w) != (2 * h2, 2 * w2):  # the row/column VALID pooling dropped gets no gradient
        dx = jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
    return (dx,)


_pool_2x2.defvjp(_pool_2x2_fwd, _pool_2x2_bwd)


def _shifted(p: jax.Array, i: int, j: int, h: int, w: int) -> jax.Array:
    """p[:, i:i+h, j:j+w] as static lax slices (they stay static under a symbolic batch size)."""
    return lax.slice_in_dim(lax.slice_in_dim(p, i, i + h, axis=1), j, j + w, axis=2)


def _window_max(x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    h, w = x.shape[1], x.shape[2]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    views = [_shifted(p, i, j, h, w) for i in range(3) for j in range(3)]
    m = views[0]
    for v in views[1:]:
        m = jnp.maximum(m, v)
    return m, views


@jax.custom_vjp
def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 max-pooling, stride 1, SAME (-inf) padding, of NHWC `x`: the Inception pool branch.

    Equals `nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")`, gradient included.
    """
    return _window_max(x)[0]


def _pool_3x3_fwd(x):
    m, views = _window_max(x)
    first = jnp.full(m.shape, 8, jnp.int8)
    for k in range(7, -1, -1):
        first = jnp.where(views[k] == m, jnp.int8(k), first)
    # Materialised here: left to fusion, XLA recomputes the nine-way maximum inside the backward
    # pass once per window position (measured 2x slower).
    return lax.optimization_barrier((m, first))


def _pool_3x3_bwd(first, g):
    """dx[p] = sum over window offsets k of g[q] where q = p - offset_k chose k."""
    h, w = g.shape[1], g.shape[2]
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    gp = jnp.pad(g, pad)
    fp = jnp.pad(first, pad, constant_values=-1)
    dx = None
    for i in range(3):
        for j in range(3):
            chose = _shifted(fp, 2 - i, 2 - j, h, w) == 3 * i + j
            term = jnp.where(chose, _shifted(gp, 2 - i, 2 - j, h, w), jnp.zeros((), g.dtype))
            dx = term if dx is None else dx + term
    return (dx,)


max_pool_3x3_same.defvjp(_pool_3x3_fwd, _pool_3x3_bwd)
