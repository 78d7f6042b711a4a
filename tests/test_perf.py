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

    def fake(backend="cpu", reason=None, platform=True):
        def unavailable_reason():
            queries.append(backend)
            return reason

        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(onednn_conv, "unavailable_reason", unavailable_reason)
        monkeypatch.setattr(onednn_conv, "available", lambda: unavailable_reason() is None)
        monkeypatch.setattr(onednn_conv, "supported_platform", lambda: platform)

    fake.queries = queries
    fake.module = onednn_conv
    perf._resolve_auto.cache_clear()
    yield fake
    perf._resolve_auto.cache_clear()


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
    """Building a model (to load or export weights) compiles nothing; only float32 can use oneDNN."""
    onednn(backend="cpu")
    for conv_impl in perf.CONV_IMPLS:
        fernet(conv_impl)
    assert onednn.queries == []
    assert perf.resolve_conv_impl("auto", "bfloat16") == "xla" and onednn.queries == []
    assert perf.resolve_conv_impl("auto", "float32") == "onednn" and onednn.queries == ["cpu"]


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
