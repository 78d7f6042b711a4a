"""fermsca.perf: which convolution `conv_impl` runs on, and the building blocks it hands FERNet."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax import lax

from fermsca import models, perf
from fermsca.perf import batchnorm, pooling, stem

SMALL = dict(num_classes=8, stem_width=8, widths=(8, 16, 32))


def model_config(conv_impl: str = "auto", dtype: str = "float32") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"conv_impl": conv_impl, "dtype": dtype})


def fernet(conv_impl: str) -> models.FERNet:
    return models.FERNet(**SMALL, **perf.building_blocks(model_config(conv_impl)))


def test_unknown_conv_impl_names_the_config_field():
    with pytest.raises(ValueError, match=r"config\.model\.conv_impl='cudnn': expected one of"):
        perf.building_blocks(model_config("cudnn"))
    with pytest.raises(ValueError, match=r"config\.model\.conv_impl='cudnn'"):
        perf.resolve_conv_impl("cudnn")


# ---------------------------------------------------------------------------------------------
# conv_impl "auto": oneDNN on an x86-64 Linux CPU where its extension builds, XLA everywhere else


@pytest.fixture
def onednn(monkeypatch):
    """`fermsca.perf.onednn_conv` as resolution sees it, faked: `set(backend, reason, platform)`, where
    reason None means the extension builds and loads; records each availability query."""
    from fermsca.perf import onednn_conv

    queries = []
    monkeypatch.delenv("FERMSCA_ONEDNN", raising=False)

    def fake(backend="cpu", reason=None, platform=True, bfloat16=None):
        def unavailable_reason():
            queries.append(backend)
            return reason

        def bfloat16_reason():
            queries.append("bfloat16")
            return bfloat16

        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(onednn_conv, "unavailable_reason", unavailable_reason)
        monkeypatch.setattr(onednn_conv, "available", lambda: unavailable_reason() is None)
        monkeypatch.setattr(onednn_conv, "supported_platform", lambda: platform)
        monkeypatch.setattr(onednn_conv, "bfloat16_reason", bfloat16_reason)

    fake.queries = queries
    fake.module = onednn_conv
    perf._resolve_auto.cache_clear()
    perf._resolve_auto_bfloat16.cache_clear()
    yield fake
    perf._resolve_auto.cache_clear()
    perf._resolve_auto_bfloat16.cache_clear()


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_is_onednn_on_a_cpu_where_it_builds(onednn, caplog):
    onednn(backend="cpu")
    assert perf.resolve_conv_impl("auto") == "onednn"
    assert perf.conv_function("auto") is onednn.module.conv_general_dilated
    assert perf.resolve_conv_impl("auto") == "onednn"
    assert onednn.queries == ["cpu"]  # cached: asked once per process
    assert _warnings(caplog) == []


@pytest.mark.parametrize("backend", ["gpu", "cuda", "tpu"])
def test_auto_is_xla_on_accelerators_without_asking_for_onednn(onednn, caplog, backend):
    onednn(backend=backend)
    assert perf.resolve_conv_impl("auto") == "xla"
    assert perf.conv_function("auto") is lax.conv_general_dilated
    assert onednn.queries == [] and _warnings(caplog) == []  # no g++ build to decide


def test_auto_falls_back_to_xla_with_one_warning_line(onednn, caplog):
    onednn(backend="cpu", reason="C++ compiler 'g++' not found on PATH; the oneDNN convolution "
                                 "extension is compiled on first use\nsecond line of detail")
    with caplog.at_level(logging.INFO, logger="fermsca.perf"):
        assert [perf.resolve_conv_impl("auto") for _ in range(3)] == ["xla"] * 3
        assert perf.conv_function("auto") is lax.conv_general_dilated
        model = fernet("auto")  # every convolution of a trace asks again
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    (warning,) = _warnings(caplog)
    assert "\n" not in warning and "second line" not in warning
    assert "config.model.conv_impl='auto'" in warning and "'g++' not found" in warning
    assert "run on XLA" in warning and "1.7-3x slower" in warning  # what it costs
    assert "install g++" in warning and "set CXX" in warning  # how to fix it
    assert onednn.queries == ["cpu"]


@pytest.mark.parametrize("why", ["other_cpu", "disabled"])
def test_auto_is_xla_quietly_where_oneDNN_is_not_meant_to_run(onednn, caplog, monkeypatch, why):
    onednn(backend="cpu", reason="never asked", platform=why != "other_cpu")
    if why == "disabled":
        monkeypatch.setenv("FERMSCA_ONEDNN", "0")
    assert perf.resolve_conv_impl("auto") == "xla"
    assert onednn.queries == [] and _warnings(caplog) == []


def test_explicit_conv_impl_is_kept(onednn):
    onednn(backend="gpu")
    assert perf.resolve_conv_impl("onednn") == "onednn"  # per-convolution XLA fallback off the CPU
    onednn(backend="cpu")
    assert perf.resolve_conv_impl("xla") == "xla"
    assert perf.conv_function("xla") is lax.conv_general_dilated
    assert perf.conv_function("onednn") is onednn.module.conv_general_dilated


def test_explicit_onednn_fails_loudly_when_unavailable(onednn, caplog):
    onednn(backend="cpu", reason="compiling onednn_conv.cc failed (exit 1)")
    with pytest.raises(RuntimeError, match=r"config\.model\.conv_impl='onednn' is unavailable: compiling"):
        perf.resolve_conv_impl("onednn")
    with pytest.raises(RuntimeError, match="is unavailable"):
        fernet("onednn").init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    assert perf.resolve_conv_impl("auto") == "xla"  # while "auto" only warns
    assert len(_warnings(caplog)) == 1


def test_building_blocks_defer_auto_to_the_trace(onednn):
    """Building a model (to load or export weights) compiles nothing; float16 never uses oneDNN."""
    onednn(backend="cpu")
    for conv_impl in perf.CONV_IMPLS:
        fernet(conv_impl)
    assert onednn.queries == []
    assert perf.resolve_conv_impl("auto", "float16") == "xla" and onednn.queries == []
    assert perf.resolve_conv_impl("auto", "float32") == "onednn" and onednn.queries == ["cpu"]


def test_auto_bfloat16_is_onednn_where_it_has_bfloat16_convolutions(onednn, caplog):
    onednn(backend="cpu", bfloat16=None)
    assert perf.resolve_conv_impl("auto", "bfloat16") == "onednn"
    assert perf.resolve_conv_impl("auto", "bfloat16") == "onednn"
    assert onednn.queries == ["cpu", "bfloat16"] and _warnings(caplog) == []  # asked once each


def test_auto_bfloat16_falls_back_to_xla_with_one_warning_where_the_cpu_lacks_them(onednn, caplog):
    why = "oneDNN bfloat16 convolution unavailable: could not create a primitive descriptor"
    onednn(backend="cpu", bfloat16=why)
    assert [perf.resolve_conv_impl("auto", "bfloat16") for _ in range(3)] == ["xla"] * 3
    assert perf.resolve_conv_impl("auto", "float32") == "onednn"  # float32 is unaffected
    (warning,) = _warnings(caplog)
    assert "could not create a primitive descriptor" in warning and "run on XLA" in warning
    with pytest.raises(RuntimeError, match="conv_impl='onednn' is unavailable: oneDNN bfloat16"):
        perf.resolve_conv_impl("onednn", "bfloat16")
    with pytest.raises(RuntimeError, match=r"config\.model\.dtype='float16'"):
        perf.resolve_conv_impl("onednn", "float16")


def test_building_blocks_are_drop_ins():
    blocks = perf.building_blocks(model_config("xla"))
    assert set(blocks) == {"conv", "norm", "pool", "stem"} and blocks["pool"] is pooling.max_pool
    assert blocks["norm"] is batchnorm.BatchNorm and blocks["stem"] is stem.FusedStem
    assert blocks["conv"].func is nn.Conv
    assert repr(blocks["conv"].keywords["conv_general_dilated"]) == "conv_function('xla')"
    fold = perf.building_blocks(model_config("xla"), lax.conv_general_dilated)
    assert fold["conv"].keywords["conv_general_dilated"] is lax.conv_general_dilated


def test_default_config_asks_for_auto():
    from configs import default
    from fermsca import config_schema

    assert default.get_config().model.conv_impl == "auto"
    for conv_impl in perf.CONV_IMPLS:  # the schema accepts exactly perf's choices
        assert config_schema.FIELDS["model.conv_impl"](conv_impl) is None
    assert config_schema.FIELDS["model.conv_impl"]("cudnn") is not None


def test_bfloat16_operands_round_both_and_accumulate_in_float32():
    rng = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(rng[0], (2, 9, 9, 5))
    w = jax.random.normal(rng[1], (3, 3, 5, 4))
    kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = perf.BFloat16Operands(lax.conv_general_dilated)
    got = conv(x, w, **kwargs)
    want = lax.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), **kwargs,
                                    preferred_element_type=jnp.float32)
    assert got.dtype == jnp.float32
    assert jnp.array_equal(got, want)
    full = lax.conv_general_dilated(x, w, **kwargs)
    assert not jnp.array_equal(got, full)  # rounded operands ...
    assert jnp.allclose(got, full, rtol=0, atol=0.05 * jnp.abs(full).max())  # ... to 8 bits
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv(x, w, **kwargs) ** 2), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.float32 and dx.shape == x.shape and dw.shape == w.shape


def test_conv_dtype_chooses_bfloat16_convolutions_in_a_float32_model():
    config = model_config("auto")
    assert perf.conv_dtype(config) == "float32"  # configs from before the field
    config.conv_dtype = "bfloat16"
    assert perf.conv_dtype(config) == "bfloat16"
    conv_fn = perf.building_blocks(config)["conv"].keywords["conv_general_dilated"]
    assert isinstance(conv_fn, perf.BFloat16Operands)
    assert (conv_fn.conv_fn.conv_impl, conv_fn.conv_fn.dtype) == ("auto", "bfloat16")  # resolved as bf16
    assert perf.conv_dtype(model_config("auto", "bfloat16")) == "bfloat16"

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    plain = models.FERNet(**SMALL, **perf.building_blocks(model_config("xla")))
    config = model_config("xla")
    config.conv_dtype = "bfloat16"
    mixed = models.FERNet(**SMALL, **perf.building_blocks(config))
    variables = plain.init(jax.random.key(1), x)
    a = plain.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    b = mixed.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    assert b.dtype == jnp.float32 and not jnp.array_equal(a, b)
    assert jnp.allclose(a, b, rtol=0, atol=0.05 * jnp.abs(a).max())


def test_schema_takes_conv_dtype():
    from configs import default
    from fermsca import config_schema

    assert default.get_config().model.conv_dtype == "float32"
    assert config_schema.FIELDS["model.conv_dtype"]("bfloat16") is None
    assert config_schema.FIELDS["model.conv_dtype"]("float16") is not None
