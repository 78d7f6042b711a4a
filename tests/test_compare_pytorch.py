"""The PyTorch mirror of FERNet used by experiments/perf/compare_pytorch.py: same parameters, same logits.

PyTorch is optional (not a fermsca dependency); CI installs the CPU build so these run there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fermsca import models

pytestmark = pytest.mark.slow  # a benchmark's helper: CI checks it after the suite

torch = pytest.importorskip("torch", reason="PyTorch is optional: pip install torch (CPU build)")
from experiments.perf import compare_pytorch  # noqa: E402


@pytest.mark.parametrize("use_bn,use_se", [(True, True), (False, False)])
def test_torch_copy_matches_fermsca(use_bn, use_se):
    model = models.FERNet(7, stem_width=8, widths=(8, 16, 32), use_bn=use_bn, use_se=use_se)
    x = np.random.default_rng(0).normal(size=(6, 48, 48, 1)).astype(np.float32)
    variables = model.init(jax.random.key(1), jnp.asarray(x))
    # Non-trivial BatchNorm statistics and biases, so the copy of every tensor matters.
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.uniform(jax.random.key(v.size), v.shape) if v.ndim == 1 else v,
        variables)
    net = compare_pytorch.build_torch_model(model)
    assert sum(p.numel() for p in net.parameters()) == models.count_params(variables["params"])
    compare_pytorch.copy_weights(jax.device_get(variables), net)
    diffs = compare_pytorch.check_equivalence(model, variables, net, x)
    assert diffs["eval_max_abs_diff"] < 1e-4 * max(1.0, diffs["logit_scale"])
    assert diffs["train_max_abs_diff"] < 1e-4 * max(1.0, diffs["logit_scale"])


def test_cosine_loss_matches_eq4():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(5, 8)).astype(np.float32), rng.random((5, 8)).astype(np.float32)
    from fermsca import losses

    expected = float(jnp.mean(losses.cosine_similarity_loss(logits, targets)))
    got = float(compare_pytorch.torch_cosine_loss(torch.from_numpy(logits), torch.from_numpy(targets)))
    assert got == pytest.approx(expected, rel=1e-6)


def test_copy_refuses_a_different_network():
    small = models.FERNet(7, stem_width=8, widths=(8, 16, 32))
    other = models.FERNet(7, stem_width=8, widths=(8, 16, 64))
    variables = jax.eval_shape(lambda: small.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    with pytest.raises(ValueError, match="shape"):
        compare_pytorch.copy_weights(variables, compare_pytorch.build_torch_model(other))


def test_paired_ratios_pair_rounds_and_refuse_unequal_lengths():
    assert compare_pytorch.paired_ratios([200.0, 120.0, 90.0], [100.0, 100.0, 60.0]) == [2.0, 1.2, 1.5]
    with pytest.raises(ValueError, match="2 rounds against 3"):
        compare_pytorch.paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])
