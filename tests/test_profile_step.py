"""The step profile's join of trace events to HLO instructions, on a small network's real HLO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.perf import profile_step
from fermsca import bench, models, train


def small_step_hlo():
    model = models.FERNet(8, stem_width=8, widths=(8, 16, 32))
    tx = optax.adam(1e-3)
    x = jnp.zeros((4, 48, 48, 1))
    state = train.create_train_state(jax.random.key(0), model, tx)
    step = jax.jit(functools.partial(bench.model_step, model=model, tx=tx))
    return step.lower(state, x, jnp.eye(8)[:4]).compile().as_text()


@pytest.mark.slow  # compiles the full-width train step
def test_every_convolution_is_classified_and_placed():
    instructions, computations = profile_step.parse_hlo(small_step_hlo())
    kinds = {name: profile_step.classify(line, computations) for name, line in instructions.items()}
    places = {profile_step.place(line, computations) for line in instructions.values()}
    # 1 stem + 3 blocks x (4 branch convs + block conv) + 2 projections = 18 convolutions, each with a
    # forward, a weight gradient and (all but the stem's, whose input needs none) an input gradient.
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in set(kinds.values())}
    assert counts["conv forward"] >= 1 and counts["conv weight gradient"] >= 1
    assert counts["conv input gradient"] >= 1
    conv_lines = [line for line in instructions.values() if " convolution(" in line]
    n_conv = len(conv_lines) + sum(
        1 for name, line in instructions.items() if kinds[name].startswith("conv") and "fusion(" in line)
    assert n_conv >= 18 * 2
    assert {"stem_conv", "block1/conv", "block2/multiscale/branch5x5"} <= places
    assert "optimiser, loss and step bookkeeping" in places


def test_markdown_shares_sum_to_total():
    record = {"step": "model", "batch_size": 8, "conv_impl": "xla", "wall_ms_per_step": 12.0,
              "thunk_ms_per_step": 10.0, "by_kind_ms": {"conv forward": 6.0, "elementwise fusions": 4.0},
              "by_place_ms": {"stem_conv": 10.0}}
    text = profile_step.markdown(record)
    assert "| conv forward | 6.0 | 60% |" in text and "| stem_conv | 10.0 | 100% |" in text
    np.testing.assert_allclose(sum(record["by_kind_ms"].values()), record["thunk_ms_per_step"])
