"""Learning-rate schedules of the paper (Tables 1 and 2) and the Adam optimiser built from config.

Boundary convention for Table 1 ("0-80: 1e-3, 81-120: 1e-4, 121-160: 1e-5, 161-180: 1e-6,
>180: 5e-7"): epochs are counted from 0, as Keras' `LearningRateScheduler` (the paper's TF 2.4 setup)
passes them, and each range is inclusive. Epoch e = step // steps_per_epoch therefore trains at 1e-3
for e <= 80 (81 epochs), at 1e-4 for 81 <= e <= 120, and so on; the rate changes at the first step of
epochs 81, 121, 161 and 181.

For shorter budgets `table1_boundaries(num_epochs)` scales these boundaries by num_epochs / 200.
Beyond the paper, `warmup_cosine` (a linear warm-up to `learning_rate`, then a cosine decay to 0)
is a schedule made for short budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

TABLE1_EPOCHS = 200
TABLE1_BOUNDARIES = (81, 121, 161, 181)  # first epoch (0-based) of each new rate
TABLE1_VALUES = (1e-3, 1e-4, 1e-5, 1e-6, 5e-7)
SCHEDULES = ("table1", "constant", "warmup_cosine")  # config.optimizer.schedule
EPOCHWISE = ("table1", "constant")  # the schedules whose rate changes only at epoch boundaries


def table1_boundaries(num_epochs: int = TABLE1_EPOCHS) -> tuple[int, ...]:
    """Table 1's boundary epochs scaled to a `num_epochs` budget (identity for 200 epochs)."""
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}")
    return tuple(round(b * num_epochs / TABLE1_EPOCHS) for b in TABLE1_BOUNDARIES)


def piecewise_constant(
    values: Sequence[float], boundary_epochs: Sequence[int], steps_per_epoch: int
) -> optax.Schedule:
    """values[i] from the first step of epoch boundary_epochs[i-1] (values[0] from step 0)."""
    if len(values) != len(boundary_epochs) + 1:
        raise ValueError(
            f"need one more value than boundaries, got {len(values)} values and "
            f"{len(boundary_epochs)} boundaries"
        )
    if list(boundary_epochs) != sorted(boundary_epochs):
        raise ValueError(f"boundary epochs must be increasing, got {list(boundary_epochs)}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return optax.join_schedules(
        [optax.constant_schedule(float(v)) for v in values],
        [int(b) * steps_per_epoch for b in boundary_epochs],
    )


def table1_schedule(steps_per_epoch: int, num_epochs: int = TABLE1_EPOCHS) -> optax.Schedule:
    """Table 1: 1e-3 / 1e-4 / 1e-5 / 1e-6 / 5e-7, boundaries scaled to `num_epochs`."""
    return piecewise_constant(TABLE1_VALUES, table1_boundaries(num_epochs), steps_per_epoch)


def create_schedule(config: Any, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """From the `optimizer` sub-config: `schedule` is 'table1' (the paper) or 'constant' (Table 2).

    'table1' uses `boundary_epochs` / `values` when given (else Table 1 scaled to `num_epochs`).
    'constant' uses `learning_rate`. 'warmup_cosine' rises linearly from 0 to `learning_rate` over
    `warmup_epochs`, then decays along a cosine to 0 at the end of `num_epochs`.
    """
    kind = config.schedule
    if kind == "constant":
        return optax.constant_schedule(float(config.learning_rate))
    if kind == "table1":
        boundaries = config.boundary_epochs or table1_boundaries(num_epochs)
        values = config["values"] or TABLE1_VALUES  # item access: ConfigDict.values is a method
        return piecewise_constant(values, boundaries, steps_per_epoch)
    if kind == "warmup_cosine":
        if not 0 <= config.warmup_epochs < num_epochs:
            raise ValueError(f"config.optimizer.warmup_epochs={config.warmup_epochs}: must be in "
                             f"[0, num_epochs={num_epochs})")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=float(config.learning_rate),
            warmup_steps=int(config.warmup_epochs) * steps_per_epoch,
            decay_steps=num_epochs * steps_per_epoch, end_value=0.0)
    raise ValueError(f"config.optimizer.schedule={kind!r}: expected one of {list(SCHEDULES)}")


def create_optimizer(
    config: Any, steps_per_epoch: int, num_epochs: int, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Adam with the configured schedule (the paper), optionally decoupled weight decay and clipping.

    `schedule`: the learning-rate schedule when the caller already built it with `create_schedule`.
    """
    if schedule is None:
        schedule = create_schedule(config, steps_per_epoch, num_epochs)
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay:
        parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay))
    else:
        parts.append(optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps))
    return optax.chain(*parts)
