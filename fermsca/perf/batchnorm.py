"""BatchNorm as one multiply-add per element: a drop-in for `flax.linen.BatchNorm` in FERNet.

The train step with oneDNN convolutions is about 1.05x faster with it than with `nn.BatchNorm`
(`python -m experiments.perf.perf_levers --variants argmax_pools nn_batchnorm`, experiments/perf/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over [B, H, W] of NHWC input (FERNet's `norm`), as one multiply-add per element.

    Same variables (params scale/bias, batch_stats mean/var), initialisers, statistics (float32,
    var = E[x^2] - E[x]^2 clipped at 0, as Flax's fast variance), running averages and output dtype;
    the normalisation (x - mean) * scale / sqrt(var + eps) + bias is computed as x * a + b with
    per-channel a = scale / sqrt(var + eps), b = bias - mean * a, whose gradient XLA fuses into fewer
    passes over the activations. Takes the arguments FERNet gives its `norm`.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def affine(self, features: int, batch_moments: Callable[[], tuple[jax.Array, jax.Array]]
               ) -> tuple[jax.Array, jax.Array]:
        """Per-channel (a, b), [features] each, with normalised x = x * a + b.

        In training `batch_moments()` gives the batch's float32 (mean, biased variance), and the running
        averages move towards them; in evaluation the running averages are used and `batch_moments` is
        not called. `perf.stem` calls this with moments computed without the stem's activations.
        """
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = batch_moments()
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        return a, bias - mean * a

    def __call__(self, x: jax.Array) -> jax.Array:
        def batch_moments():
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(xf, axis=(0, 1, 2))
            return mean, jnp.maximum(0.0, jnp.mean(xf * xf, axis=(0, 1, 2)) - mean * mean)

        a, b = self.affine(x.shape[-1], batch_moments)
        return (x * a + b).astype(self.dtype)
