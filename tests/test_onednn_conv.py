"""The oneDNN convolution fast path against `lax.conv_general_dilated` (forward and both gradients)."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fermsca.perf import onednn_conv

REPO = Path(__file__).resolve().parent.parent
NHWC = ("NHWC", "HWIO", "NHWC")

needs_onednn = pytest.mark.skipif(
    not onednn_conv.available(), reason=f"oneDNN fast path unavailable: {onednn_conv.unavailable_reason()}"
)

# The network's convolutions: (name, H=W, C_in, C_out, kernel), all stride 1 'SAME'.
NETWORK_CONVS = [
    ("stem", 48, 1, 64, 3),
    ("b1_1x1", 24, 64, 16, 1),
    ("b1_3x3", 24, 64, 16, 3),
    ("b1_5x5", 24, 64, 16, 5),
    ("b1_conv", 24, 64, 64, 3),
    ("b2_1x1", 12, 64, 32, 1),
    ("b2_3x3", 12, 64, 32, 3),
    ("b2_5x5", 12, 64, 32, 5),
    ("b2_conv", 12, 128, 128, 3),
    ("b2_proj", 12, 64, 128, 1),
    ("b3_1x1", 6, 128, 64, 1),
    ("b3_3x3", 6, 128, 64, 3),
    ("b3_5x5", 6, 128, 64, 5),
    ("b3_conv", 6, 256, 256, 3),
    ("b3_proj", 6, 128, 256, 1),
]


def _operands(seed, x_shape, w_shape):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:3])), jnp.float32)
    return x, w


def _assert_close(actual, expected, name):
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=name)


def _run_cases(conv, cases, cotangent_dtype=None):
    """{name: (y, dx, dw)} for each case name -> (x, w, conv kwargs), with dx, dw the gradients of
    <y, r> for a fixed r (rounded to `cotangent_dtype`, default y's); all cases in one jit
    (compiling a program per case would take most of the test time)."""
    operands = {name: (x, w) for name, (x, w, _) in cases.items()}

    def run(operands):
        out = {}
        for name, (x, w) in operands.items():
            kwargs = cases[name][2]
            y, vjp = jax.vjp(lambda x, w, kwargs=kwargs: conv(x, w, **kwargs), x, w)
            r = jnp.sin(0.37 * jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)  # a fixed cotangent
            r = r.astype(cotangent_dtype or y.dtype).astype(y.dtype)
            out[name] = (y, *vjp(r))
        return out

    return jax.jit(run)(operands)


def _compare_cases(cases):
    plans = {name: onednn_conv.plan(x, w, **kwargs) for name, (x, w, kwargs) in cases.items()}
    return plans, _run_cases(onednn_conv.conv_general_dilated, cases), _run_cases(lax.conv_general_dilated,
                                                                                 cases)


def _check_case(results, name):
    plans, got, want = results
    assert isinstance(plans[name], onednn_conv.ConvConfig), plans[name]
    for part, a, b in zip(("y", "dx", "dw"), got[name], want[name], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, part
        _assert_close(a, b, f"{name}: {part}")


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_missing_onednn_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("DNNLROOT", str(tmp_path))
    with pytest.raises(onednn_conv.OneDNNUnavailable, match=r"pip install -e \..*onednn-cpu-tbb"):
        onednn_conv._find_onednn()


@pytest.fixture(scope="module")
def network_results():
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    return _compare_cases({
        name: (*_operands(i, (3, hw, hw, cin), (k, k, cin, cout)), kwargs)
        for i, (name, hw, cin, cout, k) in enumerate(NETWORK_CONVS)
    })


@needs_onednn
@pytest.mark.parametrize("name", [c[0] for c in NETWORK_CONVS])
def test_network_convs_match_xla(network_results, name):
    _check_case(network_results, name)


# Other geometries the oneDNN path takes: (strides, padding, rhs_dilation) for x [2, 11, 13, 5] and
# w [3, 3, 5, 7].
GEOMETRIES = {
    "valid": ((1, 1), "VALID", None),
    "stride2_same": ((2, 2), "SAME", None),
    "explicit_asymmetric": ((2, 1), ((1, 2), (0, 1)), None),
    "dilated": ((1, 1), ((2, 2), (2, 2)), (2, 2)),
    "stride_dilation_valid": ((3, 2), "VALID", (1, 2)),
}


@pytest.fixture(scope="module")
def geometry_results():
    x, w = _operands(0, (2, 11, 13, 5), (3, 3, 5, 7))
    return _compare_cases({
        name: (x, w, dict(window_strides=s, padding=p, rhs_dilation=d, dimension_numbers=NHWC))
        for name, (s, p, d) in GEOMETRIES.items()
    })


@needs_onednn
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_other_geometries_match_xla(geometry_results, name):
    _check_case(geometry_results, name)


@needs_onednn
@pytest.mark.parametrize(
    "case", ["lhs_dilation", "float16", "nchw", "groups"],
)
def test_unsupported_cases_take_the_xla_path(case):
    x, w = _operands(0, (2, 8, 8, 4), (3, 3, 4, 6))
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    if case == "lhs_dilation":
        kwargs.update(lhs_dilation=(2, 2), padding=((1, 1), (1, 1)))
    elif case == "float16":
        x, w = x.astype(jnp.float16), w.astype(jnp.float16)
    elif case == "nchw":
        x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
        kwargs["dimension_numbers"] = ("NCHW", "OIHW", "NCHW")
    else:
        w = w[:, :, :2, :]
        kwargs["feature_group_count"] = 2
    assert isinstance(onednn_conv.plan(x, w, **kwargs), str)
    text = _lowered(lambda x, w: onednn_conv.conv_general_dilated(x, w, **kwargs), x, w)
    assert "fermsca_onednn" not in text
    got = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, **kwargs))(x, w)
    want = lax.conv_general_dilated(x, w, **kwargs)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


_NO_BFLOAT16 = onednn_conv.unavailable_reason() or onednn_conv.bfloat16_reason()
needs_bfloat16 = pytest.mark.skipif(_NO_BFLOAT16 is not None,
                                    reason=f"no oneDNN bfloat16 convolution here: {_NO_BFLOAT16}")


@pytest.fixture(scope="module")
def bfloat16_results():
    """The network's convolutions on bfloat16 operands: oneDNN against XLA computing the same
    bfloat16-rounded operands in float32 (an independent reference, not rounded in between)."""
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    cases = {}
    for i, (name, hw, cin, cout, k) in enumerate(NETWORK_CONVS):
        x, w = _operands(i, (3, hw, hw, cin), (k, k, cin, cout))
        cases[name] = (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), kwargs)
    as_f32 = {name: (x.astype(jnp.float32), w.astype(jnp.float32), kw) for name, (x, w, kw) in cases.items()}
    plans = {name: onednn_conv.plan(x, w, **kw) for name, (x, w, kw) in cases.items()}
    text = _lowered(lambda x, w: onednn_conv.conv_general_dilated(x, w, **kwargs), *cases["b1_3x3"][:2])
    return plans, text, _run_cases(onednn_conv.conv_general_dilated, cases), _run_cases(
        lax.conv_general_dilated, as_f32, cotangent_dtype=jnp.bfloat16)


@needs_bfloat16
@pytest.mark.parametrize("name", [c[0] for c in NETWORK_CONVS])
def test_bfloat16_network_convs_match_a_float32_reference(bfloat16_results, name):
    plans, text, got, want = bfloat16_results
    assert isinstance(plans[name], onednn_conv.ConvConfig), plans[name]
    assert "fermsca_onednn" in text
    for part, a, b in zip(("y", "dx", "dw"), got[name], want[name], strict=True):
        assert a.shape == b.shape and a.dtype == jnp.bfloat16, part
        # bfloat16 keeps 8 significant bits: each output is rounded once (2^-9 relative), and the
        # float32 reference's cotangent is the bfloat16 one, so only that rounding and the
        # summation order differ.
        expected = np.asarray(b, np.float64)
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(np.asarray(a, np.float64), expected, rtol=8e-3, atol=4e-3 * scale,
                                   err_msg=f"{name}: {part}")


@needs_onednn
def test_bfloat16_without_onednn_support_takes_the_xla_path(monkeypatch):
    monkeypatch.setattr(onednn_conv, "bfloat16_reason", lambda: "no bfloat16 convolution on this CPU")
    x, w = (a.astype(jnp.bfloat16) for a in _operands(0, (2, 8, 8, 4), (3, 3, 4, 6)))
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
    assert onednn_conv.plan(x, w, **kwargs) == "no bfloat16 convolution on this CPU"
    def conv(x, w):
        return onednn_conv.conv_general_dilated(x, w, **kwargs)

    assert "fermsca_onednn" not in _lowered(conv, x, w)
    got = conv(x, w)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(lax.conv_general_dilated(x, w, **kwargs), np.float32))


def test_impl_info_refuses_other_dtypes():
    with pytest.raises(ValueError, match="only float32 or bfloat16"):
        onednn_conv.impl_info("fwd", (1, 8, 8, 4), (3, 3, 4, 4), dtype=np.float16)


@needs_onednn
def test_flax_conv_jit_grad():
    kwargs = dict(features=8, kernel_size=(3, 3), padding="SAME", use_bias=True)
    fast = nn.Conv(**kwargs, conv_general_dilated=onednn_conv.conv_general_dilated)
    ref = nn.Conv(**kwargs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10, 10, 3)), jnp.float32)
    params = ref.init(jax.random.key(1), x)

    def loss(module):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.tanh(module.apply(p, x)) ** 2),
                                          argnums=(0, 1)))

    assert "fermsca_onednn_conv_fwd" in _lowered(lambda p, x: fast.apply(p, x), params, x)
    (l_fast, g_fast), (l_ref, g_ref) = loss(fast)(params, x), loss(ref)(params, x)
    _assert_close(l_fast, l_ref, "loss")
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        _assert_close(a, b, "grad")


@needs_onednn
def test_fernet_train_step_matches_xla():
    """FERNet with oneDNN convolutions against FERNet with XLA's (perf's building blocks, which
    differ only there): the same loss, gradients and BatchNorm statistics."""
    import ml_collections

    from fermsca import models, perf

    def blocks(conv_impl):
        return perf.building_blocks(ml_collections.ConfigDict({"conv_impl": conv_impl, "dtype": "float32"}))

    # One block with a projected skip: every kind of convolution of the network (stem 3x3, the
    # multiscale 1x1/3x3/5x5 branches, the block's 3x3, the 1x1 projection).
    kwargs = dict(num_classes=8, stem_width=8, widths=(16,))
    fast, ref = models.FERNet(**kwargs, **blocks("onednn")), models.FERNet(**kwargs, **blocks("xla"))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 48, 48, 1)), jnp.float32)
    variables = ref.init(jax.random.key(2), x)
    assert "fermsca_onednn_conv_fwd" in _lowered(lambda v, x: fast.apply(v, x), variables, x)

    def step(module):
        def loss(params):
            out, updates = module.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats"])
            return jnp.sum(jnp.sin(out)), updates
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (l_fast, s_fast), g_fast = step(fast)
    (l_ref, s_ref), g_ref = step(ref)
    _assert_close(l_fast, l_ref, "loss")
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves((g_fast, s_fast)), jax.tree.leaves((g_ref, s_ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4 * max(scale, float(jnp.abs(b).max())))


@pytest.mark.parametrize("conv_impl", ["auto", "xla", "onednn"])
def test_checkpoints_load_and_export_through_xla_whatever_their_conv_impl(tmp_path, conv_impl):
    """The conv_impl a run trained with changes no parameter: its checkpoint loads the same variables,
    and prediction and export run XLA's convolutions (jax2tf cannot lower the oneDNN custom call),
    also where oneDNN is unavailable."""
    import tiny_run

    from fermsca import export, inference, models, perf

    config = tiny_run.tiny_config()
    config.model.conv_impl = conv_impl
    x = jnp.zeros((1, 48, 48, 1), jnp.float32)
    xla_model = inference.build_model(config.model, 8, conv_impl="xla")
    variables = tiny_run.random_variables(xla_model, seed=1)
    if onednn_conv.available():  # the model as training builds it: the same variables
        trained = models.from_config(config.model, 8, **perf.building_blocks(config.model))
        shapes = jax.eval_shape(trained.init, jax.random.key(0), x)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
            lambda a: (a.shape, a.dtype), jax.eval_shape(xla_model.init, jax.random.key(0), x))
    loaded = inference.load(tiny_run.save_run_checkpoint(str(tmp_path), config, variables))
    assert loaded.config.model.conv_impl == conv_impl and loaded.conv_impl == "xla"
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    # Export pins XLA itself, whatever conv_impl the loaded model carries.
    served = export._float32(loaded.rebuild(conv_impl=conv_impl))
    assert served.conv_impl == "xla"
    images = np.zeros((2, 48, 48, 1), np.float32)
    text = _lowered(lambda v, im: inference.probabilities(v, im, model=served.model), loaded.variables,
                    images)
    assert "fermsca_onednn" not in text


@needs_onednn
def test_primitives_are_cached_and_thread_safe():
    x, w = _operands(3, (2, 9, 9, 6), (3, 3, 6, 5))
    fn = jax.jit(lambda x, w: onednn_conv.conv(x, w))
    want = np.asarray(fn(x, w))
    before = onednn_conv.plan_cache_size()
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(np.asarray(fn(x, w)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20 and all(np.array_equal(r, want) for r in results)
    assert onednn_conv.plan_cache_size() == before
    assert onednn_conv.impl_info("fwd", x.shape, w.shape)  # e.g. "brgconv:avx512_core +reorder(in1)"


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fermsca.perf import onednn_conv

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 12, 12, 16)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 16, 32)) / 12).astype(np.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    w = jax.device_put(w, NamedSharding(mesh, P()))

    def step(conv):
        def loss(x, w):
            y = conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(jnp.tanh(y) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    fast, ref = step(onednn_conv.conv_general_dilated), step(lax.conv_general_dilated)
    hlo = fast.lower(x, w).compile().as_text()
    assert "fermsca_onednn_conv_fwd" in hlo and "all-gather" not in hlo, hlo
    (l1, (dx1, dw1)), (l2, (dx2, dw2)) = fast(x, w), ref(x, w)
    assert dx1.sharding.spec == P("data"), dx1.sharding
    for a, b in ((l1, l2), (dx1, dx2), (dw1, dw2)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    print("SHARDED_OK")
    """
)


@needs_onednn
def test_batch_sharded_jit_matches_xla():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
