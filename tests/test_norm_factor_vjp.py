"""NormFactor.vjp into given buffers (what a compiled step and Sequential.backward use) is the
product with the dense Jacobian, per sample and shared, for LayerNorm and RMSNorm."""

import numpy as np
import pytest

from jacgrad.algebra.factors import NormFactor


@pytest.mark.parametrize("centered", [True, False])
def test_norm_factor_vjp_into_buffers_is_the_dense_product(rng, centered):
    B, n = 4, 7
    x = rng.standard_normal((B, n))
    xc = x - x.mean(1, keepdims=True) if centered else x
    inv = 1 / np.sqrt((xc ** 2).mean(1) + 1e-3)
    F = NormFactor(1 + rng.standard_normal(n), inv, xc * inv[:, None], centered=centered)
    v = rng.standard_normal((B, n))
    want = np.einsum("bij,bi->bj", F.dense(), v)
    out, work = np.empty((B, n)), (np.empty((B, n)), np.empty((B, 1)), np.empty((B, 1)))
    assert F.vjp(v, out=out, work=work) is out
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(F.vjp(v), out)
    shared = NormFactor(F.gamma, inv[0], F.xhat[0], centered=centered)
    np.testing.assert_allclose(shared.vjp(v), v @ shared.dense(), rtol=1e-12, atol=1e-12)
