"""Max-pooling through oneDNN's pooling primitives, called from XLA through `jax.ffi` (CPU).

FERNet's Inception pool branch (Fig. 2: 3x3 max-pooling, stride 1, SAME) runs here on the oneDNN
path (`perf.building_blocks`, when `config.model.conv_impl` resolves to "onednn"). XLA's CPU code
for that window takes the nine shifted maxima, a padded copy and the argmax in separate passes over
the activations, and the backward pass as many again: about 8x oneDNN's forward + backward on
block 1's [128, 24, 24, 64] activations (experiments/perf/README.md, "The pool branch on oneDNN").

`max_pool_3x3_same(x)` equals `pooling.max_pool_3x3_same(x)` and `nn.max_pool(x, (3, 3),
strides=(1, 1), padding="SAME")`, values and gradients: oneDNN's forward-training pass writes, as one
uint8 per output, which window position held the maximum (padded positions never win; the first
maximum in row-major window order, as XLA's select-and-scatter picks, pinned by
tests/test_onednn_pool.py), and its backward pass routes each output gradient there. Float32 and
bfloat16; NHWC. Like the convolutions (`onednn_conv`), the calls are wrapped in
`custom_partitioning`, so a batch-sharded input stays sharded; that wrapper has no batching (vmap)
rule, so vmapped models (the CK+ folds trained together) keep `pooling`'s XLA pools.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fermsca.perf import onednn_conv


class PoolConfig(NamedTuple):
    """Static attributes of one max-pooling (hashable; passed to the custom calls)."""

    in_hw: tuple[int, int]
    window: tuple[int, int]
    strides: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]


def _attrs(cfg: PoolConfig) -> dict:
    names = ("window", "strides", "pad_lo", "pad_hi")
    return {name: np.asarray(getattr(cfg, name), np.int64) for name in names}


def _out_hw(cfg: PoolConfig) -> tuple[int, int]:
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, lo, hi in
                 zip(cfg.in_hw, cfg.window, cfg.strides, cfg.pad_lo, cfg.pad_hi, strict=True))


def _fwd_local(x, cfg: PoolConfig):
    onednn_conv._load()  # registers the targets (once per process)
    out_shape = (*x.shape[:-3], *_out_hw(cfg), x.shape[-1])
    return jax.ffi.ffi_call(
        onednn_conv.POOL_TARGETS["fwd"],
        (jax.ShapeDtypeStruct(out_shape, x.dtype), jax.ShapeDtypeStruct(out_shape, np.uint8)),
        vmap_method="sequential",
    )(x, **_attrs(cfg))


def _bwd_local(dy, ws, cfg: PoolConfig):
    onednn_conv._load()
    dx_shape = (*dy.shape[:-3], *cfg.in_hw, dy.shape[-1])
    return jax.ffi.ffi_call(
        onednn_conv.POOL_TARGETS["bwd"], jax.ShapeDtypeStruct(dx_shape, dy.dtype), vmap_method="sequential"
    )(dy, ws, **_attrs(cfg))


# ---- sharding rules: the batch (dim 0) may be sharded; each device pools its own slice.


def _batch_sharding(mesh, arg_shape):
    sharding = arg_shape.sharding
    axes = sharding.spec[0] if isinstance(sharding, NamedSharding) and len(sharding.spec) else None
    return NamedSharding(mesh, P(axes, None, None, None))


@functools.partial(custom_partitioning, static_argnums=(1,))
def _fwd_part(x, cfg):
    return _fwd_local(x, cfg)


def _fwd_infer(cfg, mesh, arg_shapes, result_shape):
    s = _batch_sharding(mesh, arg_shapes[0])
    return s, s


def _fwd_partition(cfg, mesh, arg_shapes, result_shape):
    s = _batch_sharding(mesh, arg_shapes[0])
    return mesh, functools.partial(_fwd_local, cfg=cfg), (s, s), (s,)


_fwd_part.def_partition(
    infer_sharding_from_operands=_fwd_infer,
    partition=_fwd_partition,
    sharding_rule="b h w c -> b p q c, b p q c",
    need_replication_factors=("h", "w", "c", "p", "q"),
)


@functools.partial(custom_partitioning, static_argnums=(2,))
def _bwd_part(dy, ws, cfg):
    return _bwd_local(dy, ws, cfg)


def _bwd_infer(cfg, mesh, arg_shapes, result_shape):
    return _batch_sharding(mesh, arg_shapes[0])


def _bwd_partition(cfg, mesh, arg_shapes, result_shape):
    s = _batch_sharding(mesh, arg_shapes[0])
    return mesh, functools.partial(_bwd_local, cfg=cfg), s, (s, s)


_bwd_part.def_partition(
    infer_sharding_from_operands=_bwd_infer,
    partition=_bwd_partition,
    sharding_rule="b p q c, b p q c -> b h w c",
    need_replication_factors=("p", "q", "c", "h", "w"),
)


# ---- differentiation


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, cfg: PoolConfig):
    return _fwd_part(x, cfg)[0]


def _max_pool_fwd(x, cfg: PoolConfig):
    y, ws = _fwd_part(x, cfg)
    return y, ws


def _max_pool_bwd(cfg: PoolConfig, ws, dy):
    return (_bwd_part(dy, ws, cfg),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 max-pooling, stride 1, SAME padding, of NHWC `x` (float32 or bfloat16) on oneDNN: the
    Inception pool branch, as `pooling.max_pool_3x3_same` computes it."""
    if x.ndim != 4:
        raise ValueError(f"onednn_pool: NHWC input expected, got shape {x.shape}")
    if np.dtype(x.dtype) not in onednn_conv.DTYPE_CODES:
        raise ValueError(f"onednn_pool: float32 or bfloat16 input expected, got {x.dtype}")
    return _max_pool(x, PoolConfig(tuple(x.shape[1:3]), (3, 3), (1, 1), (1, 1), (1, 1)))


def impl_info(x_shape, window=(3, 3), strides=(1, 1), pad_lo=(1, 1), pad_hi=(1, 1), dtype=np.float32) -> str:
    """The oneDNN implementations chosen for one NHWC max-pooling, forward / backward (e.g.
    'jit:avx512_core / jit:avx512_core')."""
    n, h, w, c = x_shape
    cfg = PoolConfig((h, w), tuple(window), tuple(strides), tuple(pad_lo), tuple(pad_hi))
    geom = (n, c, h, w, *_out_hw(cfg), *cfg.window, *cfg.strides, *cfg.pad_lo, *cfg.pad_hi,
            onednn_conv.DTYPE_CODES[np.dtype(dtype)])
    arr = (ctypes.c_int64 * len(geom))(*geom)
    buf = ctypes.create_string_buffer(512)
    rc = onednn_conv._load().fermsca_onednn_pool_impl_info(arr, buf, len(buf))
    if rc != 0:
        raise RuntimeError(buf.value.decode())
    return buf.value.decode()
