"""The report's per-layer operators form the Gram matrix WᵀW only when applied, once each."""

import numpy as np

import jacgrad as jg
from jacgrad._lanczos import top_eigenvalues
from jacgrad._layer_norms import layer_dense, layer_gram


class CountingW(np.ndarray):
    """W that counts the GEMMs it takes part in as the left operand (WᵀW is one of them)."""

    gemms = 0

    def __matmul__(self, other):
        CountingW.gemms += 1
        return np.ndarray.__matmul__(self, other)


def test_gram_formed_once_on_first_use_and_operators_match_dense():
    rng = np.random.default_rng(0)
    B, h_in, h_out = 4, 7, 5  # h_out <= h_in: both operators read WᵀW
    W = rng.standard_normal((h_in, h_out)).view(CountingW)
    d = rng.standard_normal((B, h_out))
    J = jg.LayerJacobian(d, W)
    CountingW.gemms = 0
    matvec, dense = layer_gram(np, J, d), layer_dense(np, J, d)
    assert CountingW.gemms == 0  # built, not applied: no GEMM yet

    Wp = np.asarray(W)
    expected = np.stack([np.diag(d[b]) @ Wp.T @ Wp @ np.diag(d[b]) for b in range(B)])  # J_b J_bᵀ
    v = rng.standard_normal((B, h_out))
    np.testing.assert_allclose(matvec(v, slice(0, B)), np.einsum("bij,bj->bi", expected, v), rtol=1e-12)
    np.testing.assert_allclose(matvec(v[1:3], np.array([1, 2])), np.einsum("bij,bj->bi", expected[1:3], v[1:3]),
                               rtol=1e-12)
    assert CountingW.gemms == 1  # one WᵀW for every application of the matrix-free operator
    np.testing.assert_allclose(dense(np.arange(B)), expected, rtol=1e-12)
    np.testing.assert_allclose(dense(np.array([3, 0])), expected[[3, 0]], rtol=1e-12)
    assert CountingW.gemms == 2  # and one for the dense form's

    CountingW.gemms = 0
    top = top_eigenvalues(layer_gram(np, J, d), B, h_out, xp=np, dtype=np.float64, dense=layer_dense(np, J, d))
    np.testing.assert_allclose(top, np.linalg.eigvalsh(expected)[:, -1], rtol=1e-10)
    assert CountingW.gemms == 1  # the direct eigensolve (n <= DIRECT_BELOW) alone formed it
