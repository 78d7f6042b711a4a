"""The PyTorch column of the convolution benchmark times the same convolution as the JAX columns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments.perf import onednn_conv_bench

torch = pytest.importorskip("torch", reason="the PyTorch column needs torch (optional)")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_torch_functions_compute_the_benchmarked_convolution(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    w = rng.standard_normal((k, k, 3, 4)).astype(np.float32)
    r = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    fwd, fwd_bwd = onednn_conv_bench._torch_functions(x, w, r, k)

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=onednn_conv_bench.NHWC)

    y = fwd().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, conv(x, w), rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(lambda x, w: jnp.vdot(conv(x, w), r), argnums=(0, 1))(x, w)
    tdx, tdw = fwd_bwd()
    np.testing.assert_allclose(tdx.numpy().transpose(0, 2, 3, 1), dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tdw.numpy().transpose(2, 3, 1, 0), dw, rtol=1e-4, atol=1e-4)
