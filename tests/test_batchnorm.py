"""fermsca.perf.batchnorm.BatchNorm against flax.linen.BatchNorm, which it replaces in FERNet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fermsca.perf import batchnorm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_matches_flax(dtype):
    """batchnorm.BatchNorm against nn.BatchNorm: variables, outputs, running averages and gradients."""
    x = np.random.default_rng(8).standard_normal((6, 5, 4, 3)).astype(np.float32)
    x = jnp.asarray(x * 3 + 1.5).astype(dtype)
    ours = batchnorm.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
    v_ours, v_ref = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v_ref)
    variables = {"params": {"scale": jnp.asarray([0.5, -2.0, 1.0]), "bias": jnp.asarray([0.1, 0.0, -1.0])},
                 "batch_stats": {"mean": jnp.asarray([0.3, 0.0, 1.0]), "var": jnp.asarray([2.0, 1.0, 0.5])}}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)

    def loss(params, module):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, updates["batch_stats"])

    (l_o, (y_o, s_o)), g_o = jax.value_and_grad(loss, has_aux=True)(variables["params"], ours)
    (l_r, (y_r, s_r)), g_r = jax.value_and_grad(loss, has_aux=True)(variables["params"], ref)
    assert y_o.dtype == y_r.dtype == dtype
    np.testing.assert_allclose(np.asarray(y_o, np.float32), np.asarray(y_r, np.float32), **tol)
    for a, b in zip(jax.tree.leaves((s_o, g_o)), jax.tree.leaves((s_r, g_r)), strict=True):
        np.testing.assert_allclose(a, b, **tol)
    # Evaluation: the running averages.
    ev_o = batchnorm.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
    ev_r = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
    np.testing.assert_allclose(np.asarray(ev_o, np.float32), np.asarray(ev_r, np.float32), **tol)
