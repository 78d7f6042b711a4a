"""FERNet and its parts against NumPy references of eqs. (1)-(3) and of plain convolution."""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from fermsca import losses, models


def np_conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Stride-1 'SAME' convolution, x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] (odd kh, kw)."""
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out if bias is None else out + bias


def np_max_pool3_same(x: np.ndarray) -> np.ndarray:
    """3x3 max-pool, stride 1, 'SAME' (padding never wins the max)."""
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    windows = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return np.max(np.stack(windows), axis=0)


def np_relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_squeeze_excite(
    u: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> np.ndarray:
    z = u.mean(axis=(1, 2))  # eq. (1): [B, C]
    s = np_sigmoid(np_relu(z @ w1 + b1) @ w2 + b2)  # eq. (2)
    return u * s[:, None, None, :]  # eq. (3)


def paths(tree) -> set[str]:
    return {"/".join(k) for k in traverse_util.flatten_dict(tree)}


def randn(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def shapes_of(module, *args, **kwargs) -> dict:
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))


def numpy_init(module, *args, seed: int = 0, **kwargs) -> dict:
    """Variables of the shapes `module.init` gives, drawn with NumPy.

    Fan-in scaled normal kernels, unit BN scales and variances, zero biases and means; much cheaper
    on a CPU than compiling Flax's initialisers.
    """
    shapes = shapes_of(module, *args, **kwargs)
    rng = np.random.default_rng(seed)
    leaves = {}
    for key, leaf in traverse_util.flatten_dict(shapes).items():
        if key[-1] == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif key[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        assert leaf.dtype == jnp.float32, key
        leaves[key] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(leaves)


# --- SqueezeExcite -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels,reduction", [(32, 8), (16, 4)])
def test_squeeze_excite_matches_eqs_1_to_3(channels, reduction):
    u = randn((3, 5, 4, channels)) + 0.5
    module = models.SqueezeExcite(reduction=reduction)
    params = numpy_init(module, u)["params"]
    hidden = channels // reduction
    assert params["reduce"]["kernel"].shape == (channels, hidden)
    assert params["reduce"]["bias"].shape == (hidden,)
    assert params["expand"]["kernel"].shape == (hidden, channels)
    assert params["expand"]["bias"].shape == (channels,)
    # Random biases, so that the bias terms are exercised too.
    params = {
        "reduce": {"kernel": params["reduce"]["kernel"], "bias": randn((hidden,), 2)},
        "expand": {"kernel": params["expand"]["kernel"], "bias": randn((channels,), 3)},
    }
    got = module.apply({"params": params}, u)
    expected = np_squeeze_excite(
        u.astype(np.float64),
        *(
            np.asarray(params[k][n], np.float64)
            for k in ("reduce", "expand")
            for n in ("kernel", "bias")
        ),
    )
    assert got.shape == u.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_squeeze_excite_only_rescales_channels():
    u = np.abs(randn((2, 6, 6, 16))) + 0.1
    module = models.SqueezeExcite()
    got = np.asarray(module.apply(numpy_init(module, u), u))
    scale = got / u  # one sigmoid gate per (example, channel), in (0, 1)
    np.testing.assert_allclose(scale, np.broadcast_to(scale[:, :1, :1, :], scale.shape), rtol=1e-5)
    assert np.all((scale > 0) & (scale < 1))


# --- MultiScaleConv ----------------------------------------------------------------------------


def blocks(train: bool = False, reduction: int = 8) -> dict:
    """The building blocks FERNet hands its submodules: Flax's, as the paper's path runs them."""
    return dict(conv=functools.partial(nn.Conv, use_bias=False),
                norm=functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9),
                se=functools.partial(models.SqueezeExcite, reduction), pool=nn.max_pool)


def block_parts(use_bn: bool = True, use_se: bool = True) -> dict:
    """A ResidualBlock's building blocks, its MultiScaleConv included, as FERNet hands them."""
    parts = blocks()
    pool = parts.pop("pool")
    multiscale = functools.partial(models.MultiScaleConv, **parts, pool=pool, use_bn=use_bn,
                                   use_se=use_se)
    return dict(multiscale=multiscale, **parts)


def init_multiscale(features: int = 16, in_channels: int = 8, **kwargs):
    module = models.MultiScaleConv(features, **blocks(), **kwargs)
    x = randn((2, 8, 8, in_channels))
    return module, x, numpy_init(module, x)


def test_multiscale_output_shape():
    module, x, variables = init_multiscale(16, in_channels=8)
    y = jax.jit(module.apply)(variables, x)
    assert y.shape == (2, 8, 8, 16)
    branches = {"branch1x1": 1, "branch3x3": 3, "branch5x5": 5, "branch_pool": 1}
    for name, k in branches.items():
        assert variables["params"][name]["conv"]["kernel"].shape == (k, k, 8, 4)


@pytest.mark.parametrize(
    "use_bn,use_se", [(True, True), (False, True), (True, False), (False, False)]
)
def test_multiscale_ablation_switches(use_bn, use_se):
    _, _, variables = init_multiscale(use_bn=use_bn, use_se=use_se)
    params = paths(variables["params"])
    has_bn = any("/bn/" in p for p in params)
    has_se = any("/se/" in p for p in params)
    has_bias = all(
        f"{b}/conv/bias" in params for b in ("branch1x1", "branch3x3", "branch5x5", "branch_pool")
    )
    assert has_bn == use_bn
    assert ("batch_stats" in variables) == use_bn
    assert has_se == use_se
    assert has_bias == (not use_bn)  # a convolution followed by BN needs no bias
    if not use_bn and not use_se:
        assert params == {
            f"{b}/conv/{n}"
            for b in ("branch1x1", "branch3x3", "branch5x5", "branch_pool")
            for n in ("kernel", "bias")
        }


@pytest.mark.parametrize("features", [6, 10, 3])
def test_multiscale_features_must_divide_by_4(features):
    with pytest.raises(ValueError, match="multiple of 4"):
        init_multiscale(features)


def test_multiscale_branches_match_numpy_convolution():
    module, x, variables = init_multiscale(16, in_channels=8, use_bn=False, use_se=False)
    # Non-zero biases, so that bias handling is checked as well.
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    for i, b in enumerate(("branch1x1", "branch3x3", "branch5x5", "branch_pool")):
        params[b]["conv"]["bias"] = randn((4,), 10 + i)
    y = np.asarray(jax.jit(module.apply)({"params": params}, x))
    x64 = x.astype(np.float64)

    def ref(name, inputs):
        conv = params[name]["conv"]
        return np_relu(np_conv_same(inputs, np.asarray(conv["kernel"], np.float64), conv["bias"]))

    # The 1x1 branch is a per-pixel matmul + ReLU.
    w1 = params["branch1x1"]["conv"]["kernel"][0, 0]  # [Cin, 4]
    np.testing.assert_allclose(
        y[..., 0:4], np_relu(x64 @ w1 + params["branch1x1"]["conv"]["bias"]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(y[..., 4:8], ref("branch3x3", x64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[..., 8:12], ref("branch5x5", x64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        y[..., 12:16], ref("branch_pool", np_max_pool3_same(x64)), rtol=1e-5, atol=1e-5
    )


# --- ResidualBlock -----------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels,features,projected", [(8, 16, True), (16, 16, False)])
def test_residual_block_shapes_and_projection(in_channels, features, projected):
    block = models.ResidualBlock(features, **block_parts())
    x = randn((2, 6, 6, in_channels))
    variables = numpy_init(block, x)
    y = jax.jit(block.apply)(variables, x)
    assert y.shape == (2, 6, 6, features)
    assert np.all(np.asarray(y) >= 0)  # ReLU after the addition
    names = set(variables["params"])
    assert {"multiscale", "conv", "bn", "se"} <= names
    assert ("proj_conv" in names) == projected
    assert ("proj_bn" in names) == projected
    if projected:
        assert variables["params"]["proj_conv"]["kernel"].shape == (1, 1, in_channels, features)


def test_residual_block_ablation_keeps_its_own_bn_and_se():
    block = models.ResidualBlock(16, **block_parts(use_bn=False, use_se=False))
    x = randn((2, 6, 6, 8))
    variables = shapes_of(block, x)
    multiscale = paths(variables["params"]["multiscale"])
    assert not any("/bn/" in p or "/se/" in p for p in multiscale)
    assert "multiscale" not in variables["batch_stats"]
    assert {"bn", "se", "proj_bn"} <= set(variables["params"])
    assert {"bn", "proj_bn"} == set(variables["batch_stats"])


# --- FERNet ------------------------------------------------------------------------------------

SMALL = dict(num_classes=8, stem_width=8, widths=(8, 16, 32))


@pytest.fixture(scope="module")
def small_net():
    model = models.FERNet(**SMALL)
    x = randn((4, 16, 16, 1), seed=5)
    variables = numpy_init(model, x)
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return x, variables, evaluate, train


def test_fernet_output_shape_48x48():
    x = jnp.zeros((2, 48, 48, 1))
    for num_classes in (8, 7):
        model = models.FERNet(num_classes, 8, (8, 16, 32))
        out = jax.eval_shape(lambda m=model: m.init_with_output(jax.random.key(0), x)[0])
        assert out.shape == (2, num_classes)
        assert out.dtype == jnp.float32


def test_fernet_init_keeps_float32_params_and_statistics():
    x = jnp.zeros((1, 48, 48, 1))
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.FERNet(**SMALL, dtype=dtype)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
        assert set(variables) == {"params", "batch_stats"}
        for leaf in jax.tree_util.tree_leaves(variables):
            assert leaf.dtype == jnp.float32


def test_fernet_eval_is_deterministic_and_per_example(small_net):
    x, variables, evaluate, _ = small_net
    a = evaluate(variables, x)
    assert a.shape == (4, 8) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, evaluate(variables, x))
    # Each example's logits do not depend on the rest of the batch.
    changed = x.copy()
    changed[0] = randn((16, 16, 1), seed=9) * 3.0
    np.testing.assert_allclose(evaluate(variables, changed)[1:], a[1:], rtol=1e-5, atol=1e-6)


def test_fernet_train_mode_uses_and_updates_batch_statistics(small_net):
    x, variables, evaluate, train = small_net
    logits, updated = train(variables, x)
    assert logits.shape == (4, 8)
    old = traverse_util.flatten_dict(variables["batch_stats"])
    new = traverse_util.flatten_dict(updated["batch_stats"])
    assert old.keys() == new.keys()
    for key in old:
        assert not np.allclose(old[key], new[key]), key
    # The stem BatchNorm sees the stem convolution of the batch: running statistics move 10% of the
    # way (momentum 0.9) from their initial (0, 1) towards the batch mean and (biased) variance.
    conv = np_conv_same(
        x.astype(np.float64), np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64)
    )
    np.testing.assert_allclose(
        new[("stem_bn", "mean")], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new[("stem_bn", "var")], 0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Batch statistics make an example's logits depend on the other examples, unlike eval mode.
    changed = x.copy()
    changed[0] = randn((16, 16, 1), seed=9) * 3.0
    other, _ = train(variables, changed)
    assert not np.allclose(other[1:], logits[1:], atol=1e-4)
    assert not np.allclose(logits, evaluate(variables, x), atol=1e-4)
    # The training step itself leaves the parameters alone.
    assert set(updated) == {"batch_stats"}


def test_fernet_bfloat16_compute_is_close_to_float32(small_net):
    x, variables, evaluate, _ = small_net
    model = models.FERNet(**SMALL, dtype=jnp.bfloat16)

    @jax.jit
    def both_modes(v, x):
        return model.apply(v, x, train=False), model.apply(
            v, x, train=True, mutable=["batch_stats"]
        )

    bf16, (train_logits, updated) = both_modes(variables, x)
    fp32 = np.asarray(evaluate(variables, x))
    assert bf16.dtype == jnp.float32 and train_logits.dtype == jnp.float32
    assert np.all(np.isfinite(bf16)) and np.all(np.isfinite(train_logits))
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05 * np.abs(fp32).max())
    for leaf in jax.tree_util.tree_leaves(updated):
        assert leaf.dtype == jnp.float32
        assert np.all(np.isfinite(leaf))


def test_fernet_dropout_only_in_train_mode(small_net):
    x, variables, evaluate, _ = small_net
    model = models.FERNet(**SMALL, dropout_rate=0.5)  # dropout adds no variables

    @jax.jit
    def both_modes(v, x, key):
        train, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return model.apply(v, x, train=False), train

    eval_1, train_1 = both_modes(variables, x, jax.random.key(1))
    eval_2, train_2 = both_modes(variables, x, jax.random.key(2))
    np.testing.assert_array_equal(eval_1, eval_2)
    np.testing.assert_allclose(eval_1, evaluate(variables, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_1, train_2)


def model_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stem_width = 8
    c.widths = (8, 16, 32)
    c.use_bn = False
    c.use_se = True
    c.se_reduction = 4
    c.dropout_rate = 0.25
    c.dtype = "bfloat16"
    c.update(overrides)
    return c


def test_from_config():
    model = models.from_config(model_config(), num_classes=7)
    assert isinstance(model, models.FERNet)
    assert (model.num_classes, model.stem_width, tuple(model.widths)) == (7, 8, (8, 16, 32))
    assert (model.use_bn, model.use_se, model.se_reduction) == (False, True, 4)
    assert model.dropout_rate == 0.25
    assert model.dtype == jnp.bfloat16
    assert models.from_config(model_config(dtype="float32"), 8).dtype == jnp.float32
    without_dropout = model_config()
    del without_dropout["dropout_rate"]
    with pytest.raises(AttributeError, match="dropout_rate"):  # no fallback: configs/default.py has it
        models.from_config(without_dropout, 8)
    with pytest.raises(ValueError, match="float64"):
        models.from_config(model_config(dtype="float64"), 8)


def test_from_config_takes_building_blocks():
    """Blocks given to from_config reach every layer (here: a convolution that counts its calls)."""
    calls = []

    def counting_conv(*args, **kwargs):
        calls.append(args[1].shape)
        return jax.lax.conv_general_dilated(*args, **kwargs)

    conv = functools.partial(nn.Conv, conv_general_dilated=counting_conv)
    model = models.from_config(model_config(dtype="float32"), 8, conv=conv, pool=nn.max_pool)
    assert (model.conv, model.pool, model.norm) == (conv, nn.max_pool, nn.BatchNorm)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    # stem + per block: 4 branches, the block's conv, and a projection where widths change (2 of 3)
    assert len(calls) == 1 + 3 * 5 + 2


def tiny_param_count(use_bn: bool, use_se: bool) -> int:
    """FERNet(num_classes=3, stem_width=8, widths=(8, 16, 16)), r = 8, counted by hand.

    conv: k*k*Cin*Cout (+ Cout bias when not followed by BN); BN: scale + bias = 2C;
    SE on C channels: hidden h = max(1, C // 8), C*h + h + h*C + C.
    """
    stem = 3 * 3 * 1 * 8 + 2 * 8 + (8 * 1 + 1 + 1 * 8 + 8)  # conv 72 + BN 16 + SE 25 = 113

    def unit(k, cin, f):  # one branch of the multiscale module; f <= 4 so SE hidden = 1
        conv = k * k * cin * f + (0 if use_bn else f)
        bn = 2 * f if use_bn else 0
        se = (f * 1 + 1 + 1 * f + f) if use_se else 0
        return conv + bn + se

    def multiscale(cin, features):
        f = features // 4
        return unit(1, cin, f) + unit(3, cin, f) + unit(5, cin, f) + unit(1, cin, f)

    se8 = 8 * 1 + 1 + 1 * 8 + 8  # 25
    se16 = 16 * 2 + 2 + 2 * 16 + 16  # 82
    block1 = multiscale(8, 8) + 3 * 3 * 8 * 8 + 2 * 8 + se8  # 8 -> 8: no projection
    block2 = (
        multiscale(8, 16) + 3 * 3 * 16 * 16 + 2 * 16 + se16 + 1 * 1 * 8 * 16 + 2 * 16
    )  # 8 -> 16: 1x1 projection conv + BN
    block3 = multiscale(16, 16) + 3 * 3 * 16 * 16 + 2 * 16 + se16  # 16 -> 16
    classifier = 16 * 3 + 3
    return stem + block1 + block2 + block3 + classifier


def test_count_params_matches_hand_count():
    # The arithmetic, written out for the full model:
    #   stem 113; block1 multiscale 27 + 155 + 411 + 27 = 620, + 576 + 16 + 25 = 1237;
    #   block2 multiscale 53 + 309 + 821 + 53 = 1236, + 2304 + 32 + 82 + 128 + 32 = 3814;
    #   block3 multiscale 85 + 597 + 1621 + 85 = 2388, + 2304 + 32 + 82 = 4806; classifier 51.
    assert tiny_param_count(True, True) == 113 + 1237 + 3814 + 4806 + 51 == 10021
    # Without BN and SE each branch loses 2f (BN) + 3f + 1 (SE) and gains f (bias).
    assert tiny_param_count(False, False) == 10021 - 4 * (4 + 7 - 2) - 2 * 4 * (8 + 13 - 4) == 9849
    x = jnp.zeros((1, 48, 48, 1))
    for use_bn, use_se in [(True, True), (False, True), (True, False), (False, False)]:
        model = models.FERNet(3, 8, (8, 16, 16), use_bn=use_bn, use_se=use_se)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
        assert models.count_params(variables["params"]) == tiny_param_count(use_bn, use_se), (
            use_bn,
            use_se,
        )


def test_flops_per_image_grows_with_width():
    small = models.flops_per_image(models.FERNet(8, 8, (8, 16, 32)), batch=2)
    wide = models.flops_per_image(models.FERNet(8, 16, (16, 32, 64)), batch=2)
    assert small > 0
    # Doubling every width roughly quadruples the convolution cost.
    assert wide > 2.5 * small


def test_fernet_overfits_a_small_random_set():
    """32 random 48x48 images with random labels among 8 classes are memorised (eval mode)."""
    n, k = 32, 8
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(n, 48, 48, 1)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, k, size=n))
    targets = jax.nn.one_hot(labels, k)
    model = models.FERNet(k, stem_width=16, widths=(16, 32, 32))
    variables = numpy_init(model, images[:1], seed=1)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits, updated = model.apply(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(losses.cross_entropy(logits, targets)), updated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def accuracy(params, batch_stats):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    start = time.perf_counter()
    acc, step = 0.0, 0
    while step < 300 and acc < 1.0:
        for _ in range(10):
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
        step += 10
        acc = float(accuracy(params, batch_stats))
    elapsed = time.perf_counter() - start
    assert acc == 1.0, f"train accuracy {acc:.3f} after {step} steps (loss {float(loss):.3f})"
    assert np.isfinite(float(loss))
    print(f"memorised after {step} steps in {elapsed:.1f} s")
