"""Speed work, kept apart from the paper's network: the building blocks `models.FERNet` runs with.

FERNet takes its convolution, normalisation and pools as module arguments (`flax.linen.Conv`,
`nn.BatchNorm`, `nn.max_pool` by default). `building_blocks(config.model)` is the one place that
chooses faster drop-ins with the same parameters and mathematics:

- `conv`: `nn.Conv` whose convolution runs through oneDNN (`onednn_conv`, a CPU custom call) when
  `config.model.conv_impl` resolves to "onednn", XLA's otherwise;
- `norm`: `batchnorm.BatchNorm`, the normalisation as one multiply-add per element;
- `pool`: `pooling.max_pool`, whose gradient is routed by an int8 argmax stored in the forward pass;
- `stem`: `stem.FusedStem` (float32), the stem's conv + BatchNorm + ReLU + pool in one pass over its
  activations, with the BatchNorm statistics taken from the patches' Gram matrix.

One precision option sits here too, because it only changes how the convolutions compute:
`config.model.conv_dtype = "bfloat16"` wraps the convolution in `BFloat16Operands` (operands rounded
to bfloat16, accumulated and returned in float32; every other layer float32). Unlike the levers
above it changes the numbers, so it is off by default and never part of the paper's configuration.

`hugepages` backs large allocations with transparent huge pages (called by the command-line entry
points). What each lever gains, and the levers that were tried and removed, are measured in
experiments/perf/README.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fermsca.perf import batchnorm, pooling, stem

log = logging.getLogger(__name__)

# config.model.conv_impl: "auto" (oneDNN where it can run, see `resolve_conv_impl`), "xla" or "onednn".
# The paths share parameters and mathematics; only the speed differs.
CONV_IMPLS = ("auto", "xla", "onednn")
CONV_DTYPES = ("float32", "bfloat16")  # config.model.conv_dtype: the convolutions' operand precision
ONEDNN_DTYPES = ("float32", "bfloat16")  # config.model.dtype values the oneDNN convolutions take


def check_conv_impl(conv_impl: str) -> None:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"config.model.conv_impl={conv_impl!r}: expected one of {list(CONV_IMPLS)}")


def resolve_conv_impl(conv_impl: str, dtype: str = "float32") -> str:
    """The convolution path that `conv_impl` runs on: "xla" or "onednn".

    "auto": oneDNN on a CPU backend on x86-64 Linux when its extension builds and loads (and, for a
    bfloat16 model, when oneDNN has a bfloat16 convolution for this CPU), XLA otherwise (GPU, other
    CPUs, float16, FERMSCA_ONEDNN=0); never fails, and warns once when oneDNN should run here but
    cannot. "onednn" raises when unavailable. Cached: the check (and the g++ build, itself cached on
    disk) happens once per process.
    """
    check_conv_impl(conv_impl)
    if conv_impl == "auto":
        # oneDNN takes float32 and bfloat16 convolutions only: no extension to build for nothing.
        if dtype not in ONEDNN_DTYPES:
            return "xla"
        resolved = _resolve_auto(jax.default_backend())
        if resolved == "onednn" and dtype == "bfloat16":
            return _resolve_auto_bfloat16()
        return resolved
    if conv_impl == "onednn":
        from fermsca.perf import onednn_conv

        reason = onednn_conv.unavailable_reason()
        if reason is None and dtype == "bfloat16":
            reason = onednn_conv.bfloat16_reason()
        elif reason is None and dtype not in ONEDNN_DTYPES:
            reason = f"config.model.dtype={dtype!r} (oneDNN convolutions: {list(ONEDNN_DTYPES)})"
        if reason is not None:
            raise RuntimeError(f"config.model.conv_impl='onednn' is unavailable: {reason}")
    return conv_impl


@functools.cache
def _resolve_auto_bfloat16() -> str:
    from fermsca.perf import onednn_conv

    reason = onednn_conv.bfloat16_reason()
    if reason is None:
        return "onednn"
    log.warning("config.model.conv_impl='auto': %s; bfloat16 convolutions run on XLA.", reason[:300])
    return "xla"


@functools.cache
def _resolve_auto(backend: str) -> str:
    if backend != "cpu":
        return "xla"  # accelerators: XLA's own convolution libraries
    from fermsca.perf import onednn_conv

    if not onednn_conv.supported_platform():
        log.info("config.model.conv_impl='auto': XLA convolutions (the oneDNN path is x86-64 Linux only)")
        return "xla"
    if onednn_conv.disabled():
        log.info("config.model.conv_impl='auto': XLA convolutions (FERMSCA_ONEDNN=0)")
        return "xla"
    reason = onednn_conv.unavailable_reason()
    if reason is None:
        return "onednn"
    log.warning(
        "config.model.conv_impl='auto': oneDNN convolutions unavailable (%s); convolutions run on XLA, "
        "about 1.7-3x slower on this CPU. To fix: install g++ (apt-get install g++) or set CXX to a C++ "
        "compiler, and oneDNN (pip install -e .); conv_impl=onednn shows the whole error, "
        "conv_impl=xla silences this.", (reason.splitlines() or ["no reason given"])[0][:300])
    return "xla"


def conv_function(conv_impl: str, dtype: str = "float32") -> Callable:
    """The `lax.conv_general_dilated` drop-in that `conv_impl` runs on (see `resolve_conv_impl`)."""
    if resolve_conv_impl(conv_impl, dtype) == "xla":
        return lax.conv_general_dilated
    from fermsca.perf import onednn_conv

    return onednn_conv.conv_general_dilated


def conv_dtype(model_config: Any) -> str:
    """The dtype the convolutions' operands take: the model's, or bfloat16 where
    `config.model.conv_dtype` asks for it (configs from before that field: float32)."""
    if getattr(model_config, "conv_dtype", "float32") == "bfloat16":
        return "bfloat16"
    return model_config.dtype


class BFloat16Operands:
    """A `lax.conv_general_dilated` drop-in that rounds both operands to bfloat16 and accumulates and
    returns in the input's dtype (`config.model.conv_dtype = "bfloat16"` in a float32 model: mixed
    precision for the convolutions alone, every other layer in float32; gradients flow back through
    the rounding unchanged, as bfloat16)."""

    def __init__(self, conv_fn: Callable):
        self.conv_fn = conv_fn

    def __call__(self, lhs, rhs, *args, preferred_element_type=None, **kwargs):
        out = self.conv_fn(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), *args,
                           preferred_element_type=jnp.float32, **kwargs)
        return out.astype(preferred_element_type or lhs.dtype)

    def __repr__(self):
        return f"BFloat16Operands({self.conv_fn!r})"


class _LazyConvFunction:
    """Resolves `conv_impl` when the model is first traced, not when it is built, so that building
    a model only to load, check or export weights never compiles the oneDNN extension."""

    def __init__(self, conv_impl: str, dtype: str):
        check_conv_impl(conv_impl)
        self.conv_impl, self.dtype = conv_impl, dtype

    def __call__(self, *args, **kwargs):
        return conv_function(self.conv_impl, self.dtype)(*args, **kwargs)

    def __repr__(self):
        return f"conv_function({self.conv_impl!r})"


def building_blocks(model_config: Any, conv_general_dilated: Callable | None = None) -> dict[str, Any]:
    """FERNet's fast building blocks for `model_config` (its conv_impl and dtype), as keyword
    arguments of `models.from_config`: {"conv": nn.Conv on the chosen convolution, "norm":
    `batchnorm.BatchNorm`, "pool": `pooling.max_pool`, "stem": `stem.FusedStem` (float32 only;
    other dtypes keep `models.Stem`)}. `conv_general_dilated` overrides the convolution function (e.g.
    the per-fold convolution of `fermsca.crossval`)."""
    operand_dtype = conv_dtype(model_config)
    conv_fn = conv_general_dilated or _LazyConvFunction(model_config.conv_impl, operand_dtype)
    if model_config.dtype == "float32" and operand_dtype == "bfloat16":
        conv_fn = BFloat16Operands(conv_fn)
    blocks = {"conv": functools.partial(nn.Conv, conv_general_dilated=conv_fn), "norm": batchnorm.BatchNorm,
              "pool": pooling.max_pool}
    if model_config.dtype == "float32":
        blocks["stem"] = stem.FusedStem
    return blocks
