"""fermsca.perf.stem (FusedStem, conv_relu_pool, moments) against models.Stem built from Flax's own
nn.Conv, nn.BatchNorm and nn.max_pool, and against a NumPy convolution in float64."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_run

from fermsca import models, perf
from fermsca.perf import batchnorm, stem

CONV = functools.partial(nn.Conv, use_bias=False)


def _norm(module, train):
    return functools.partial(module, use_running_average=not train, momentum=0.9, epsilon=1e-5)


def _stems(features, train):
    plain = models.Stem(features, conv=CONV, norm=_norm(nn.BatchNorm, train), pool=nn.max_pool)
    fused = stem.FusedStem(features, conv=CONV, norm=_norm(batchnorm.BatchNorm, train), pool=nn.max_pool)
    return plain, fused


def _numpy_conv3x3(x, kernel):
    """SAME 3x3 cross-correlation of [B, H, W, 1] with [3, 3, 1, F], float64."""
    b, h, w, _ = x.shape
    p = np.pad(x[..., 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += p[:, i:i + h, j:j + w, None] * kernel[i, j, 0].astype(np.float64)
    return out


def test_moments_match_the_convolution_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 9, 1)).astype(np.float32) * 2 + 0.5
    kernel = rng.standard_normal((3, 3, 1, 5)).astype(np.float32)
    mean, var = stem.moments(jnp.asarray(x), jnp.asarray(kernel.reshape(9, 5)))
    y = _numpy_conv3x3(x, kernel)
    np.testing.assert_allclose(mean, y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, y.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 12, 12, 1), (3, 9, 11, 1)])  # an odd side: VALID drops a row
def test_conv_relu_pool_value_and_gradients_match_numpy(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32) * 0.5
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, 6)).astype(np.float32)

    def reference(x, kernel, b):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return nn.max_pool(jax.nn.relu(y + b), (2, 2), strides=(2, 2))

    def fused(x, kernel, b):
        return stem.conv_relu_pool(x, kernel.reshape(9, -1), b)

    want = reference(x, kernel, b)
    np.testing.assert_allclose(fused(x, kernel, b), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(fused)(x, kernel, b), want, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * g)  # noqa: E731
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, kernel, b)
    ref = jax.grad(loss(reference), argnums=(0, 1, 2))(x, kernel, b)
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_fused_stem_matches_flax_stem(train):
    """Same variables from the same key; same output, running statistics and gradients (kernel, scale,
    bias and image), in training (batch statistics) and evaluation (running averages)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 10, 10, 1)).astype(np.float32) * 1.5 + 0.3)
    plain, fused = _stems(8, train)
    v_plain, v_fused = plain.init(jax.random.key(3), x), fused.init(jax.random.key(3), x)
    assert jax.tree.structure(v_plain) == jax.tree.structure(v_fused)
    for a, b in zip(jax.tree.leaves(v_plain), jax.tree.leaves(v_fused), strict=True):
        np.testing.assert_array_equal(a, b)
    variables = jax.tree.map(lambda a: a, v_plain)
    variables["params"]["stem_bn"] = {"scale": jnp.linspace(-1.5, 2.0, 8), "bias": jnp.linspace(-0.5, 0.5, 8)}
    variables["batch_stats"]["stem_bn"] = {"mean": jnp.linspace(-0.2, 0.3, 8), "var": jnp.linspace(0.5, 3, 8)}
    g = jnp.asarray(rng.standard_normal((6, 5, 5, 8)).astype(np.float32))

    def loss(params, x, module):
        out, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(out * g), (out, updates["batch_stats"])

    results = []
    for module in (plain, fused):
        (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                  static_argnums=2)(variables["params"], x, module)
        results.append((aux, grads))
    (aux_p, grads_p), (aux_f, grads_f) = results
    np.testing.assert_allclose(aux_f[0], aux_p[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves((aux_f[1], grads_f)), jax.tree.leaves((aux_p[1], grads_p)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if not train:
        np.testing.assert_array_equal(aux_f[1]["stem_bn"]["mean"],
                                      variables["batch_stats"]["stem_bn"]["mean"])


def test_fernet_with_perf_building_blocks_keeps_variables_and_logits():
    """FERNet on perf.building_blocks (FusedStem among them) against plain Flax: the same variables
    (checkpoints are interchangeable; their initial values: test_fused_stem_matches_flax_stem) and
    the same training logits and gradients."""
    cfg = type("M", (), dict(conv_impl="xla", dtype="float32"))()
    blocks = perf.building_blocks(cfg)
    assert blocks["stem"] is stem.FusedStem
    fast = models.FERNet(num_classes=5, stem_width=8, widths=(8, 16, 16), **blocks)
    plain = models.FERNet(num_classes=5, stem_width=8, widths=(8, 16, 16))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 24, 24, 1)).astype(np.float32))
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x)
    assert jax.eval_shape(fast.init, jax.random.key(0), x) == shapes
    variables = tiny_run.random_variables(plain, seed=4)

    def loss(params, model):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits)), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, l_fast), g_fast = step(variables["params"], fast)
    (_, l_plain), g_plain = step(variables["params"], plain)
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # Other dtypes keep the plain stem.
    assert "stem" not in perf.building_blocks(type("M", (), dict(conv_impl="xla", dtype="bfloat16"))())


def test_conv_relu_pool_under_vmap_equals_each_fold_alone():
    """Cross-validation vmaps the stem over folds (per-fold kernels and biases)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 8, 8, 1)).astype(np.float32)
    w = rng.standard_normal((3, 9, 4)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    f = lambda x, w, b: jnp.sum(jnp.cos(stem.conv_relu_pool(x, w, b)))  # noqa: E731
    batched = jax.vmap(jax.value_and_grad(f, argnums=(1, 2)))(x, w, b)
    for k in range(3):
        alone = jax.value_and_grad(f, argnums=(1, 2))(x[k], w[k], b[k])
        for a, c in zip(jax.tree.leaves(alone), jax.tree.leaves(batched), strict=True):
            np.testing.assert_allclose(c[k], a, rtol=1e-5, atol=1e-6)


def test_fused_stem_refuses_what_it_cannot_compute():
    _, fused = _stems(4, True)
    with pytest.raises(ValueError, match="one-channel float32"):
        fused.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    bad_norm = stem.FusedStem(4, conv=CONV, norm=_norm(nn.BatchNorm, True), pool=nn.max_pool)
    with pytest.raises(TypeError, match="batchnorm.BatchNorm"):
        bad_norm.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
