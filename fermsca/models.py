"""The multiscale convolutional attention residual network (Wang & Zhang, 2023, Figs. 1-4).

Each concept of the paper is a module of its own:

- `SqueezeExcite`: channel attention, eqs. (1)-(3), reduction r = 8.
- `MultiScaleConv`: the improved Inception module of Fig. 2, with BatchNorm and SE after the convolutions
  of each scale.
- `ResidualBlock`: Fig. 3, MultiScaleConv -> conv + BN -> SE, plus a skip connection.
- `Stem`: Fig. 4's first layers, 3x3 conv + BN + ReLU + 2x2 max-pool.
- `FERNet`: Fig. 4, stem conv + pool + SE, three residual blocks with max-pooling between them, global
  average pooling and a dense classifier.

The paper gives no layer widths; every width is an argument (and a config field). Parameters are kept in
float32 (`param_dtype`); `dtype` sets the compute precision (e.g. `jnp.bfloat16`). The convolution,
normalisation, pooling and stem are module arguments (Flax's defaults; `fermsca.perf` has faster drop-ins).

Run `python -m fermsca.models` for a per-layer summary with parameter count and FLOPs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any


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


class ConvUnit(nn.Module):
    """Convolution -> [BatchNorm] -> ReLU -> [SE]: one scale of the improved Inception module."""

    features: int
    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    se: ModuleDef
    use_bn: bool = True
    use_se: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, features]
        k = self.kernel_size
        x = self.conv(self.features, (k, k), padding="SAME", use_bias=not self.use_bn, name="conv")(x)
        if self.use_bn:
            x = self.norm(name="bn")(x)
        x = nn.relu(x)
        if self.use_se:
            x = self.se(name="se")(x)
        return x


class MultiScaleConv(nn.Module):
    """The improved Inception module of Fig. 2.

    Four parallel branches see the same input: 1x1, 3x3 and 5x5 convolutions, and a 3x3 max-pool
    (stride 1) followed by a 1x1 projection. Each branch's convolution is followed by BatchNorm and
    squeeze-and-excitation (the paper's improvement; `use_bn` / `use_se` switch them for the Table 3
    ablation). The branch outputs are concatenated along channels: `features` must divide by 4.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    se: ModuleDef
    pool: Callable
    use_bn: bool = True
    use_se: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C_in] -> [B, H, W, features]
        if self.features % 4:
            raise ValueError(f"MultiScaleConv features={self.features} must be a multiple of 4")
        unit = functools.partial(ConvUnit, self.features // 4, conv=self.conv, norm=self.norm,
                                 se=self.se, use_bn=self.use_bn, use_se=self.use_se)
        b1 = unit(1, name="branch1x1")(x)
        b3 = unit(3, name="branch3x3")(x)
        b5 = unit(5, name="branch5x5")(x)
        pooled = self.pool(x, (3, 3), strides=(1, 1), padding="SAME")
        bp = unit(1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, b5, bp], axis=-1)


class ResidualBlock(nn.Module):
    """Residual block of Fig. 3: MultiScaleConv -> 3x3 conv + BN -> SE, added to the input.

    The input is projected by a 1x1 convolution (+ BN) when its channel count differs from `features`.
    `multiscale` builds the block's MultiScaleConv (its `use_bn` / `use_se` are the Table 3
    ablation); the block's own conv + BN and SE are part of the residual structure, always present.
    """

    features: int
    multiscale: ModuleDef
    conv: ModuleDef
    norm: ModuleDef
    se: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.multiscale(self.features, name="multiscale")(x)
        y = self.conv(self.features, (3, 3), padding="SAME", name="conv")(y)
        y = self.norm(name="bn")(y)
        y = self.se(name="se")(y)
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = self.conv(self.features, (1, 1), name="proj_conv")(x)
            shortcut = self.norm(name="proj_bn")(shortcut)
        return nn.relu(shortcut + y)


class Stem(nn.Module):
    """The first layers of Fig. 4: 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool, stride 2.

    FERNet shares its scope with the stem, so the stem's layers are FERNet's `stem_conv` and `stem_bn`.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    pool: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H // 2, W // 2, features]
        x = self.conv(self.features, (3, 3), padding="SAME", name="stem_conv")(x)
        x = self.norm(name="stem_bn")(x)
        x = nn.relu(x)
        return self.pool(x, (2, 2), strides=(2, 2))


class FERNet(nn.Module):
    """The multiscale convolutional attention residual network of Fig. 4.

    48x48x1 input -> stem 3x3 conv + BN + ReLU -> 2x2 max-pool -> SE -> ResidualBlock(widths[0]) ->
    2x2 max-pool -> ResidualBlock(widths[1]) -> 2x2 max-pool -> ResidualBlock(widths[2]) -> global
    average pooling -> [dropout] -> Dense(num_classes) logits (softmax is applied by the loss).

    The building blocks are arguments, as in Flax's ResNet: `conv` (an `nn.Conv`-like module),
    `norm` (an `nn.BatchNorm`-like module), `pool` (`nn.max_pool`'s signature) and `stem` (`Stem`'s
    fields and variables).
    """

    num_classes: int
    stem_width: int = 64
    widths: Sequence[int] = (64, 128, 256)
    use_bn: bool = True
    use_se: bool = True
    se_reduction: int = 8
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    pool: Callable = nn.max_pool
    stem: ModuleDef = Stem

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # [B, 48, 48, 1]
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype)
        se = functools.partial(SqueezeExcite, self.se_reduction, dtype=self.dtype)
        x = x.astype(self.dtype)
        stem = self.stem(self.stem_width, conv=conv, norm=norm, pool=self.pool)
        nn.share_scope(self, stem)  # the stem's layers are this module's stem_conv and stem_bn
        x = stem(x)  # [B, 24, 24, stem_width]
        x = se(name="stem_se")(x)
        multiscale = functools.partial(MultiScaleConv, conv=conv, norm=norm, se=se, pool=self.pool,
                                       use_bn=self.use_bn, use_se=self.use_se)
        for i, width in enumerate(self.widths):
            if i > 0:
                x = self.pool(x, (2, 2), strides=(2, 2))
            x = ResidualBlock(width, multiscale, conv, norm, se, name=f"block{i + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling: [B, C]
        if self.dropout_rate:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def from_config(config: Any, num_classes: int, **blocks: Any) -> FERNet:
    """`FERNet` from the `model` sub-config (configs/default.py); `blocks` replace the default building
    blocks (`conv`, `norm`, `pool`, `stem`; `fermsca.perf.building_blocks` gives the fast ones)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={config.dtype!r}: expected one of {sorted(DTYPES)}")
    return FERNet(
        num_classes=num_classes,
        stem_width=config.stem_width,
        widths=tuple(config.widths),
        use_bn=config.use_bn,
        use_se=config.use_se,
        se_reduction=config.se_reduction,
        dropout_rate=config.dropout_rate,
        dtype=DTYPES[config.dtype],
        **blocks,
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
