"""FERNet's stem (`models.Stem`: 3x3 conv 1 -> F, BatchNorm, ReLU, 2x2 max-pool) in fewer passes over
its activations: a drop-in `stem` building block with the same variables and mathematics.

The stem's convolution output, [B, 48, 48, F], is the network's largest activation (F = 64: 75 MB at
batch 128), and the plain stem passes over it several times: the convolution writes it, BatchNorm
reads it for its statistics and again to normalise, the pool reads that; the backward pass writes
and reads it as often. Here:

- Statistics without the activations. With one input channel the convolution is y = P w, P the
  [N, 9] 3x3 patches of the image and w the [9, F] kernel, so the batch mean of y is mean(P) w and
  its mean square is the diagonal of w^T (P^T P / N) w: a 9x9 Gram matrix of the patches, not a
  pass over y. The variance is E[y^2] - E[y]^2 clipped at 0, as `batchnorm.BatchNorm` computes it.
- One forward pass. BatchNorm's x * a + b folds into the kernel (w a) and a bias; the convolution
  (nine multiply-adds per output), ReLU, the 2x2 max and its int8 argmax (`pooling`) are one
  elementwise pass that writes only the pooled [B, 24, 24, F] output.
- One backward pass and one product. The output gradient is routed by the argmax, masked where the
  recomputed pre-activation is not positive, and reduced against the patches (with a column of ones
  for the bias) in one [10, N] x [N, F] product.

The gradients reaching the kernel, scale and bias are the plain stem's, through the statistics
included (JAX differentiates the Gram formula); tests/test_stem.py pins values, gradients and
running statistics against `models.Stem` with `nn.Conv` and `nn.BatchNorm`. The train step is
measured in experiments/perf/README.md (`perf_levers`: `fused_stem`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fermsca.perf import pooling

_HIGHEST = lax.Precision.HIGHEST


def patches(x: jax.Array) -> list[jax.Array]:
    """The nine 3x3 SAME-padded views of one-channel NHWC `x`, [B, H, W, 1] each, in the row-major
    order of an HWIO kernel's first two axes (kernel.reshape(9, F)[k] multiplies view k)."""
    b, h, w, _ = x.shape
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [lax.slice(p, (0, i, j, 0), (b, i + h, j + w, 1)) for i in range(3) for j in range(3)]


def moments(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over [B, H, W] of the convolution of `x` ([B, H, W, 1]) with `w`
    ([9, F]), from the patches' mean and Gram matrix."""
    p = jnp.concatenate(patches(x), axis=-1).reshape(-1, 9)
    gram = jnp.dot(p.T, p, precision=_HIGHEST) / p.shape[0]
    mean = jnp.dot(jnp.mean(p, axis=0), w, precision=_HIGHEST)
    mean_square = jnp.sum(w * jnp.dot(gram, w, precision=_HIGHEST), axis=0)
    return mean, jnp.maximum(0.0, mean_square - mean * mean)


def _pre_activation(views: list[jax.Array], w: jax.Array, b: jax.Array) -> jax.Array:
    z = b
    for k, v in enumerate(views):
        z = z + v * w[k]
    return z


@jax.custom_vjp
def conv_relu_pool(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """max_pool_2x2(relu(conv3x3_same(x, w) + b)) for one-channel NHWC `x` and `w` [9, F] (the kernel
    with BatchNorm's scale folded in), `b` [F]: [B, H // 2, W // 2, F]."""
    return pooling.reshape_max_2x2(jax.nn.relu(_pre_activation(patches(x), w, b)))


def _conv_relu_pool_fwd(x, w, b):
    m, first = pooling._pool_2x2_fwd(jax.nn.relu(_pre_activation(patches(x), w, b)), x.shape[1:3])
    return m, (x, w, b, first)


def _conv_relu_pool_bwd(residuals, g):
    x, w, b, first = residuals
    bsz, h, wd, _ = x.shape
    (g_relu,) = pooling._pool_2x2_bwd((h, wd), first, g)
    views = patches(x)
    g_z = jnp.where(_pre_activation(views, w, b) > 0, g_relu, jnp.zeros((), g.dtype))
    p1 = jnp.concatenate(views + [jnp.ones_like(views[0])], axis=-1).reshape(-1, 10)
    g_flat = g_z.reshape(-1, g_z.shape[-1])
    g_wb = jnp.dot(p1.T, g_flat, precision=_HIGHEST)  # [10, F]: rows 0-8 the kernel, row 9 the bias
    # The image's gradient (dead code in a train step, which XLA removes): each patch gradient
    # g_z w^T goes back to the pixels it was read from.
    g_p = jnp.dot(g_flat, w.T, precision=_HIGHEST).reshape(bsz, h, wd, 9)
    g_pp = jnp.pad(g_p, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g_x = sum(lax.slice(g_pp, (0, 2 - i, 2 - j, 3 * i + j), (bsz, 2 - i + h, 2 - j + wd, 3 * i + j + 1))
              for i in range(3) for j in range(3))
    return g_x.astype(x.dtype), g_wb[:9], g_wb[9]


conv_relu_pool.defvjp(_conv_relu_pool_fwd, _conv_relu_pool_bwd)


class _Kernel(nn.Module):
    """Holds the stem convolution's kernel under the convolution's name, as `nn.Conv` creates it."""

    shape: tuple[int, ...]
    init: Callable

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", self.init, self.shape, jnp.float32)


class FusedStem(nn.Module):
    """`models.Stem` for a one-channel float32 input and a `batchnorm.BatchNorm` norm: the same
    variables (stem_conv/kernel, stem_bn/{scale, bias, mean, var}), outputs and gradients, computed
    as `conv_relu_pool` with statistics from `moments`. `pool` is unused (the 2x2 max is built in)."""

    features: int
    conv: Any
    norm: Any
    pool: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 1 or x.dtype != jnp.float32:
            raise ValueError(f"FusedStem takes one-channel float32 NHWC images, got {x.dtype} {x.shape}")
        conv = self.conv(self.features, (3, 3), padding="SAME", parent=None)  # read, never bound
        if conv.use_bias:
            raise ValueError("FusedStem: the stem convolution has no bias (BatchNorm follows it)")
        kernel = _Kernel((3, 3, 1, self.features), conv.kernel_init, name="stem_conv")()
        w = kernel.reshape(9, self.features)
        bn = self.norm(name="stem_bn")
        if not hasattr(bn, "affine"):
            raise TypeError(f"FusedStem needs fermsca.perf.batchnorm.BatchNorm as norm, got {type(bn)}")
        a, b = bn.affine(self.features, lambda: moments(x, w))
        return conv_relu_pool(x, w * a, b)
