"""The multiscale convolutional attention residual network (Wang & Zhang, 2023, Figs. 1-4).

Each concept of the paper is a module of its own:

- `SqueezeExcite`: channel attention, eqs. (1)-(3), reduction r = 8.
- `MultiScaleConv`: the improved Inception module of Fig. 2, with BatchNorm and SE after the convolutions
  of each scale.
- `ResidualBlock`: Fig. 3, MultiScaleConv -> conv + BN -> SE, plus a skip connection.
- `FERNet`: Fig. 4, stem conv + pool + SE, three residual blocks with max-pooling between them, global
  average pooling and a dense classifier.

The paper gives no layer widths; every width is an argument (and a config field). Parameters are kept in
float32 (`param_dtype`); `dtype` sets the compute precision (e.g. `jnp.bfloat16`).

Run `python -m fermsca.models` for a per-layer summary with parameter count and FLOPs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fermsca.pooling import max_pool_2x2, max_pool_3x3_same

Dtype = Any
log = logging.getLogger(__name__)
# config.model.conv_impl: "auto" (oneDNN where it can run, see `resolve_conv_impl`), "xla" or "onednn".
# The paths share parameters and mathematics; only the speed differs.
CONV_IMPLS = ("auto", "xla", "onednn")


def _check_conv_impl(conv_impl: str) -> None:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"config.model.conv_impl={conv_impl!r}: expected one of {list(CONV_IMPLS)}")


def resolve_conv_impl(conv_impl: str) -> str:
    """The convolution path that `conv_impl` runs on: "xla" or "onednn".

    "auto": oneDNN (`fermsca.onednn_conv`) on a CPU backend on x86-64 Linux when its extension builds
    and loads, XLA otherwise (GPU, other CPUs, FERMSCA_ONEDNN=0); never fails, and warns once when
    oneDNN should run here but cannot. "onednn" raises when unavailable. Cached: the check (and the
    g++ build, itself cached on disk) happens once per process, when a model is first traced.
    """
    _check_conv_impl(conv_impl)
    if conv_impl == "auto":
        return _resolve_auto(jax.default_backend())
    if conv_impl == "onednn":
        from fermsca import onednn_conv

        if not onednn_conv.available():
            raise RuntimeError(
                f"config.model.conv_impl='onednn' is unavailable: {onednn_conv.unavailable_reason()}")
    return conv_impl


@functools.cache
def _resolve_auto(backend: str) -> str:
    if backend != "cpu":
        return "xla"  # accelerators: XLA's own convolution libraries
    from fermsca import onednn_conv

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


def conv_function(conv_impl):
    """The `conv_general_dilated` for `nn.Conv` under `conv_impl` ("auto", "xla" or "onednn", see
    `resolve_conv_impl`): None (XLA's) or the oneDNN custom call (`fermsca.onednn_conv`, a CPU fast
    path with the same mathematics). A function given as conv_impl (a drop-in for
    `jax.lax.conv_general_dilated`, e.g. `crossval.fold_conv`) is returned as it is."""
    if callable(conv_impl):
        return conv_impl
    if resolve_conv_impl(conv_impl) == "xla":
        return None
    from fermsca import onednn_conv

    return onednn_conv.conv_general_dilated


class BatchNorm(nn.Module):
    """`nn.BatchNorm(momentum, epsilon)` over [B, H, W] of NHWC input, as one multiply-add per element.

    Same variables (params scale/bias, batch_stats mean/var), initialisers, statistics (float32,
    var = E[x^2] - E[x]^2 clipped at 0, as Flax's fast variance), running averages and output dtype;
    the normalisation (x - mean) * scale / sqrt(var + eps) + bias is computed as x * a + b with
    per-channel a = scale / sqrt(var + eps), b = bias - mean * a, whose gradient XLA fuses into fewer
    passes over the activations (experiments/results/bench/perf_levers.json).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=(0, 1, 2)) - mean * mean)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        b = bias - mean * a
        return (x * a + b).astype(self.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel attention, eqs. (1)-(3), reduction r = 8.

    z = mean_{H,W}(u) (1); s = sigmoid(W2 relu(W1 z)) (2); x~ = s * u (3).
    """

    reduction: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:  # u: [B, H, W, C]
        channels = u.shape[-1]
        hidden = max(1, channels // self.reduction)
        z = jnp.mean(u, axis=(1, 2))  # eq. (1): [B, C]
        s = nn.Dense(hidden, dtype=self.dtype, name="reduce")(z)  # W1
        s = nn.relu(s)
        s = nn.Dense(channels, dtype=self.dtype, name="expand")(s)  # W2
        s = nn.sigmoid(s)  # eq. (2)
        return u * s[:, None, None, :].astype(u.dtype)  # eq. (3)


def conv_same(x: jax.Array, kernel: jax.Array, dtype: Dtype, conv_impl: str = "xla") -> jax.Array:
    """Stride-1 SAME convolution in `dtype`, as `nn.Conv` computes it (NHWC input, HWIO kernel)."""
    fn = conv_function(conv_impl) or jax.lax.conv_general_dilated
    k = kernel.shape[:2]
    padding = [((k[0] - 1) // 2, k[0] // 2), ((k[1] - 1) // 2, k[1] // 2)]
    return fn(x.astype(dtype), kernel.astype(dtype), (1, 1), padding,
              dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvKernel(nn.Module):
    """An `nn.Conv`'s kernel (and bias) under the same names, shapes and initialisers, not applied.

    Lets convolutions that read the same input run as one wider convolution (`fuse_projection`)
    while the parameters stay where `nn.Conv` keeps them, so checkpoints are interchangeable.
    """

    shape: tuple[int, int, int, int]  # HWIO
    use_bias: bool = False

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros_init(), (self.shape[-1],), jnp.float32)
                if self.use_bias else None)
        return kernel, bias


class ConvUnit(nn.Module):
    """Convolution -> [BatchNorm] -> ReLU -> [SE]: one scale of the improved Inception module."""

    features: int
    kernel_size: int
    use_bn: bool = True
    use_se: bool = True
    se_reduction: int = 8
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, shortcut_kernel: jax.Array | None = None):
        """[B, H, W, C] -> [B, H, W, features]; with `shortcut_kernel` ([k, k, C, F'], the residual
        block's projection), also that convolution of x, computed in the same convolution:
        returns (unit output, projected x)."""
        k = self.kernel_size
        if shortcut_kernel is None:
            x = nn.Conv(
                self.features, (k, k), padding="SAME", use_bias=not self.use_bn, dtype=self.dtype,
                conv_general_dilated=conv_function(self.conv_impl), name="conv",
            )(x)
            shortcut = None
        else:
            kernel, bias = ConvKernel((k, k, x.shape[-1], self.features), use_bias=not self.use_bn,
                                      name="conv")()
            both = conv_same(x, jnp.concatenate([kernel, shortcut_kernel], axis=-1), self.dtype,
                             self.conv_impl)
            x, shortcut = both[..., :self.features], both[..., self.features:]
            if bias is not None:
                x = x + bias.astype(x.dtype)
        if self.use_bn:
            x = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                          name="bn")(x)
        x = nn.relu(x)
        if self.use_se:
            x = SqueezeExcite(self.se_reduction, dtype=self.dtype, name="se")(x)
        return x if shortcut is None else (x, shortcut)


class MultiScaleConv(nn.Module):
    """The improved Inception module of Fig. 2.

    Four parallel branches see the same input: 1x1, 3x3 and 5x5 convolutions, and a 3x3 max-pool
    (stride 1) followed by a 1x1 projection. Each branch's convolution is followed by BatchNorm and
    squeeze-and-excitation (the paper's improvement; `use_bn` / `use_se` switch them for the Table 3
    ablation). The branch outputs are concatenated along channels: `features` must divide by 4.
    """

    features: int
    use_bn: bool = True
    use_se: bool = True
    se_reduction: int = 8
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, shortcut_kernel: jax.Array | None = None):
        """[B, H, W, C_in] -> [B, H, W, features]. With `shortcut_kernel` (a 1x1 kernel reading the
        same x), the 1x1 branch computes that convolution too: returns (output, projected x)."""
        if self.features % 4:
            raise ValueError(f"MultiScaleConv features={self.features} must be a multiple of 4")
        unit = functools.partial(
            ConvUnit, self.features // 4, use_bn=self.use_bn, use_se=self.use_se,
            se_reduction=self.se_reduction, dtype=self.dtype, conv_impl=self.conv_impl,
        )
        b1 = unit(1, name="branch1x1")(x, train, shortcut_kernel)
        if shortcut_kernel is not None:
            b1, shortcut = b1
        b3 = unit(3, name="branch3x3")(x, train)
        b5 = unit(5, name="branch5x5")(x, train)
        pooled = max_pool_3x3_same(x)
        bp = unit(1, name="branch_pool")(pooled, train)
        y = jnp.concatenate([b1, b3, b5, bp], axis=-1)  # [B, H, W, features]
        return y if shortcut_kernel is None else (y, shortcut)


class ResidualBlock(nn.Module):
    """Residual block of Fig. 3: MultiScaleConv -> 3x3 conv + BN -> SE, added to the input.

    The input is projected by a 1x1 convolution (+ BN) when its channel count differs from `features`.
    `use_bn` / `use_se` apply to the multiscale module (the Table 3 ablation); the block's own conv + BN
    and SE are part of the residual structure and always present. `fuse_projection` computes the
    projection and the multiscale 1x1 branch, both 1x1 convolutions of x, as one convolution (same
    parameters and mathematics). Off by default: 1.6x faster for the pair alone, but no faster in
    the whole step (experiments/results/bench/perf_levers.json).
    """

    features: int
    use_bn: bool = True
    use_se: bool = True
    se_reduction: int = 8
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    fuse_projection: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 conv_general_dilated=conv_function(self.conv_impl))
        multiscale = MultiScaleConv(self.features, self.use_bn, self.use_se, self.se_reduction,
                                    dtype=self.dtype, conv_impl=self.conv_impl, name="multiscale")
        project = x.shape[-1] != self.features
        if project and self.fuse_projection:
            kernel, _ = ConvKernel((1, 1, x.shape[-1], self.features), name="proj_conv")()
            y, shortcut = multiscale(x, train, shortcut_kernel=kernel)
        else:
            y = multiscale(x, train)
            shortcut = conv(self.features, (1, 1), name="proj_conv")(x) if project else x
        y = conv(self.features, (3, 3), padding="SAME", name="conv")(y)
        y = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                      name="bn")(y)
        y = SqueezeExcite(self.se_reduction, dtype=self.dtype, name="se")(y)
        if project:
            shortcut = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 name="proj_bn")(shortcut)
        return nn.relu(shortcut + y)


class FERNet(nn.Module):
    """The multiscale convolutional attention residual network of Fig. 4.

    48x48x1 input -> stem 3x3 conv + BN + ReLU -> 2x2 max-pool -> SE -> ResidualBlock(widths[0]) ->
    2x2 max-pool -> ResidualBlock(widths[1]) -> 2x2 max-pool -> ResidualBlock(widths[2]) -> global
    average pooling -> [dropout] -> Dense(num_classes) logits (softmax is applied by the loss).
    """

    num_classes: int
    stem_width: int = 64
    widths: Sequence[int] = (64, 128, 256)
    use_bn: bool = True
    use_se: bool = True
    se_reduction: int = 8
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # "auto" | "xla" | "onednn" (CPU custom call, same mathematics)
    fuse_projection: bool = False  # see ResidualBlock

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, 48, 48, 1]
        x = x.astype(self.dtype)
        x = nn.Conv(self.stem_width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                    conv_general_dilated=conv_function(self.conv_impl), name="stem_conv")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                      name="stem_bn")(x)
        x = nn.relu(x)
        x = max_pool_2x2(x)  # [B, 24, 24, stem]
        x = SqueezeExcite(self.se_reduction, dtype=self.dtype, name="stem_se")(x)
        for i, width in enumerate(self.widths):
            if i > 0:
                x = max_pool_2x2(x)
            x = ResidualBlock(width, self.use_bn, self.use_se, self.se_reduction,
                              dtype=self.dtype, conv_impl=self.conv_impl,
                              fuse_projection=self.fuse_projection, name=f"block{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling: [B, C]
        if self.dropout_rate:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


def from_config(config: Any, num_classes: int) -> FERNet:
    """Builds `FERNet` from the `model` sub-config (see configs/default.py).

    conv_impl "auto" is resolved when the model is first traced (`resolve_conv_impl`), so building a
    model only to load, check or export weights never compiles the oneDNN extension.
    """
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if config.dtype not in dtypes:
        raise ValueError(f"config.model.dtype={config.dtype!r}: expected one of {sorted(dtypes)}")
    conv_impl = config.get("conv_impl", "auto")
    _check_conv_impl(conv_impl)
    if conv_impl == "auto" and config.dtype != "float32":
        conv_impl = "xla"  # oneDNN takes float32 convolutions only: no extension to build for nothing
    return FERNet(
        num_classes=num_classes,
        stem_width=config.stem_width,
        widths=tuple(config.widths),
        use_bn=config.use_bn,
        use_se=config.use_se,
        se_reduction=config.se_reduction,
        dropout_rate=config.get("dropout_rate", 0.0),
        dtype=dtypes[config.dtype],
        conv_impl=conv_impl,
        fuse_projection=config.get("fuse_projection", False),
    )


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def flops_per_image(model: nn.Module, image_size: int = 48, batch: int = 8) -> float:
    """Forward-pass FLOPs per image (eval mode) as counted by XLA's cost analysis."""
    x = jnp.zeros((batch, image_size, image_size, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"]) / batch


def summary(model: nn.Module, image_size: int = 48) -> str:
    x = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    table = nn.tabulate(model, jax.random.key(0), depth=2,
                        console_kwargs={"width": 140, "force_terminal": False})(x)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    n = count_params(variables["params"])
    flops = flops_per_image(model, image_size)
    return (f"{table}\nparameters: {n:,}\nforward FLOPs per {image_size}x{image_size} image: "
            f"{flops / 1e6:,.1f} MFLOPs ({flops / 2e6:,.1f} M multiply-adds)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Summarise FERNet: layers, parameters, FLOPs.")
    parser.add_argument("--num_classes", type=int, default=8)
    parser.add_argument("--stem_width", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs=3, default=(64, 128, 256))
    parser.add_argument("--no_bn", action="store_true")
    parser.add_argument("--no_se", action="store_true")
    args = parser.parse_args()
    model = FERNet(args.num_classes, args.stem_width, tuple(args.widths),
                   use_bn=not args.no_bn, use_se=not args.no_se)
    print(summary(model))


if __name__ == "__main__":
    main()
