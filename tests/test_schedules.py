"""Table 1 / Table 2 learning rates and the Adam optimiser built from config."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fermsca import schedules


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.schedule = "table1"
    c.learning_rate = 1e-3
    c.boundary_epochs = ()
    c.values = ()
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-7
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0
    c.warmup_epochs = 0
    c.update(overrides)
    return c


def table1_rate(epoch: int) -> float:
    """Table 1 read literally, 0-based epochs and inclusive ranges."""
    if epoch <= 80:
        return 1e-3
    if epoch <= 120:
        return 1e-4
    if epoch <= 160:
        return 1e-5
    if epoch <= 180:
        return 1e-6
    return 5e-7


@pytest.mark.parametrize("steps_per_epoch", [1, 7])
def test_table1_both_sides_of_every_boundary(steps_per_epoch):
    s = steps_per_epoch
    schedule = schedules.table1_schedule(steps_per_epoch=s, num_epochs=200)
    last_step = lambda epoch: (epoch + 1) * s - 1
    first_step = lambda epoch: epoch * s
    cases = [
        (first_step(0), 1e-3),
        (last_step(80), 1e-3),
        (first_step(81), 1e-4),
        (last_step(120), 1e-4),
        (first_step(121), 1e-5),
        (last_step(160), 1e-5),
        (first_step(161), 1e-6),
        (last_step(180), 1e-6),
        (first_step(181), 5e-7),
        (last_step(199), 5e-7),
    ]
    for step, expected in cases:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, err_msg=f"{step=}")


def test_table1_every_step_matches_the_table():
    s = 3
    schedule = schedules.table1_schedule(steps_per_epoch=s, num_epochs=200)
    steps = np.arange(200 * s)
    got = np.asarray(schedule(jnp.asarray(steps)))
    expected = np.array([table1_rate(step // s) for step in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_table1_boundaries():
    assert schedules.table1_boundaries() == (81, 121, 161, 181)
    assert schedules.table1_boundaries(200) == (81, 121, 161, 181)
    assert schedules.table1_boundaries(20) == (8, 12, 16, 18)
    with pytest.raises(ValueError, match="num_epochs"):
        schedules.table1_boundaries(0)


def test_table1_schedule_scaled_to_20_epochs():
    schedule = schedules.table1_schedule(steps_per_epoch=5, num_epochs=20)
    for step, expected in [
        (39, 1e-3),
        (40, 1e-4),
        (59, 1e-4),
        (60, 1e-5),
        (79, 1e-5),
        (80, 1e-6),
        (89, 1e-6),
        (90, 5e-7),
        (99, 5e-7),
    ]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, err_msg=f"{step=}")


@pytest.mark.parametrize("rate", [1e-2, 1e-3, 1e-4, 1e-5])  # Table 2's constant rates
def test_constant_schedule_table2_rates(rate):
    schedule = schedules.create_schedule(
        optimizer_config(schedule="constant", learning_rate=rate),
        steps_per_epoch=10,
        num_epochs=200,
    )
    for step in (0, 809, 810, 1999, 10**6):
        np.testing.assert_allclose(float(schedule(step)), rate, rtol=1e-6)


def test_create_schedule_table1_default_uses_scaled_table():
    schedule = schedules.create_schedule(optimizer_config(), steps_per_epoch=2, num_epochs=20)
    np.testing.assert_allclose(float(schedule(15)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(16)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(36)), 5e-7, rtol=1e-6)


def test_create_schedule_custom_boundaries_and_values():
    config = optimizer_config(boundary_epochs=(2, 5), values=(0.1, 0.01, 0.001))
    schedule = schedules.create_schedule(config, steps_per_epoch=4, num_epochs=10)
    for step, expected in [(0, 0.1), (7, 0.1), (8, 0.01), (19, 0.01), (20, 0.001), (39, 0.001)]:
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, err_msg=f"{step=}")


def test_create_schedule_errors():
    mismatched = optimizer_config(boundary_epochs=(2, 5), values=(0.1, 0.01))
    with pytest.raises(ValueError, match="one more value"):
        schedules.create_schedule(mismatched, steps_per_epoch=4, num_epochs=10)
    # Custom boundaries with the default (five) Table 1 values do not match either.
    with pytest.raises(ValueError, match="one more value"):
        schedules.create_schedule(optimizer_config(boundary_epochs=(3,)), 4, 10)
    with pytest.raises(ValueError, match="cosine_decay"):
        schedules.create_schedule(optimizer_config(schedule="cosine_decay"), 4, 10)
    with pytest.raises(ValueError, match="increasing"):
        schedules.piecewise_constant((1.0, 0.1, 0.01), (5, 2), steps_per_epoch=4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        schedules.piecewise_constant((1.0, 0.1), (5,), steps_per_epoch=0)


def np_adam(grads, lrs, b1, b2, eps, params=None, weight_decay=0.0):
    """Plain Adam (Kingma & Ba, eps outside the square root); decoupled decay as in AdamW."""
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    updates = []
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        step = m_hat / (np.sqrt(v_hat) + eps)
        if weight_decay:
            step = step + weight_decay * params
        updates.append(-lr * step)
        if params is not None:
            params = params + updates[-1]
    return updates


def run_optimizer(tx: optax.GradientTransformation, grads, params):
    state = tx.init(jnp.asarray(params))
    p = jnp.asarray(params)
    updates = []
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, u)
        updates.append(np.asarray(u))
    return updates


def test_adam_first_step_is_lr_times_sign():
    config = optimizer_config(schedule="constant", learning_rate=1e-3, eps=1e-7)
    tx = schedules.create_optimizer(config, steps_per_epoch=10, num_epochs=200)
    g = np.array([0.5, -2.0, 1e-3, -3e-4], np.float32)
    (update,) = run_optimizer(tx, [g], np.zeros(4, np.float32))
    np.testing.assert_allclose(update, -1e-3 * g / (np.abs(g) + 1e-7), rtol=1e-5)
    np.testing.assert_allclose(update, -1e-3 * np.sign(g), rtol=1e-3)


def test_adam_steps_match_numpy_with_eps_and_schedule():
    # A large eps makes its place in the formula visible; the rate drops after one 2-step epoch.
    config = optimizer_config(boundary_epochs=(1,), values=(0.1, 0.01), b1=0.8, b2=0.9, eps=0.5)
    tx = schedules.create_optimizer(config, steps_per_epoch=2, num_epochs=4)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
    got = run_optimizer(tx, grads, np.zeros(5, np.float32))
    expected = np_adam(grads, [0.1, 0.1, 0.01, 0.01], b1=0.8, b2=0.9, eps=0.5)
    for t, (u, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")


def test_adamw_weight_decay_matches_numpy():
    config = optimizer_config(schedule="constant", learning_rate=0.05, weight_decay=0.1, eps=1e-3)
    tx = schedules.create_optimizer(config, steps_per_epoch=1, num_epochs=1)
    rng = np.random.default_rng(1)
    params = rng.normal(size=6).astype(np.float32)
    grads = [rng.normal(size=6).astype(np.float32) for _ in range(3)]
    got = run_optimizer(tx, grads, params)
    expected = np_adam(
        grads, [0.05] * 3, b1=0.9, b2=0.999, eps=1e-3, params=params, weight_decay=0.1
    )
    for u, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7)


def test_grad_clip_norm_clips_before_adam():
    config = optimizer_config(schedule="constant", learning_rate=0.1, grad_clip_norm=1.0, eps=1e-2)
    tx = schedules.create_optimizer(config, steps_per_epoch=1, num_epochs=1)
    grads = [np.array([3.0, 4.0], np.float32), np.array([0.3, -0.4], np.float32)]
    got = run_optimizer(tx, grads, np.zeros(2, np.float32))
    clipped = [grads[0] / 5.0, grads[1]]  # global norms 5 (clipped to 1) and 0.5 (kept)
    expected = np_adam(clipped, [0.1, 0.1], b1=0.9, b2=0.999, eps=1e-2)
    for u, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7)


def test_warmup_cosine_rises_linearly_then_follows_a_cosine_to_zero():
    """Against the formula: lr(t) = peak * t / W for t < W, then peak * (1 + cos(pi (t - W) /
    (T - W))) / 2, with W = warmup_epochs * S and T = num_epochs * S steps."""
    config = optimizer_config(schedule="warmup_cosine", learning_rate=2e-3, warmup_epochs=2)
    steps_per_epoch, num_epochs = 5, 10
    schedule = schedules.create_schedule(config, steps_per_epoch, num_epochs)
    warm, total = 2 * steps_per_epoch, num_epochs * steps_per_epoch
    for t in range(total + 1):
        if t < warm:
            expected = 2e-3 * t / warm
        else:
            expected = 2e-3 * (1 + np.cos(np.pi * (t - warm) / (total - warm))) / 2
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"warmup_epochs=10: must be in \[0, num_epochs=10\)"):
        schedules.create_schedule(optimizer_config(schedule="warmup_cosine", warmup_epochs=10), 5, 10)
