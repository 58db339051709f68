"""The bias gradient is the GEMV ``1ᵀδ`` on NumPy (``_passes.column_sums``): as accurate as the
column sum, against float64 sums, in the function and in a network's backward."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.protocol.passes import column_sums


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-14)])
@pytest.mark.parametrize("B", [1, 2, 33, 256])
def test_bias_gradient_is_the_column_sum_of_the_deltas(rng, dtype, tol, B):
    delta = rng.standard_normal((B, 37)).astype(dtype)
    out = np.empty(37, dtype)
    got = column_sums(delta, out)
    assert got is out
    ref = delta.astype(np.float64).sum(axis=0)
    scale = np.abs(delta.astype(np.float64)).sum(axis=0)
    assert np.all(np.abs(got - ref) <= tol * scale + 1e-300)
    # and it is what a network's backward pass returns as ∂L/∂b, against torch-free float64 sums
    net = jg.MLP.init([5, 37, 3], activation="tanh", seed=1, dtype=dtype)
    x = rng.standard_normal((B, 5)).astype(dtype)
    y, cache = net.forward(x)
    g = net.backward(cache, rng.standard_normal((B, 3)).astype(dtype))
    for d, db in zip(g.deltas, g.biases):
        d64 = d.astype(np.float64)
        assert np.all(np.abs(db - d64.sum(axis=0)) <= tol * np.abs(d64).sum(axis=0) + 1e-300)
