"""The report's per-layer operators form the Gram matrix WᵀW only when applied, once each."""

import numpy as np

import jacgrad as jg
from jacgrad.algebra.lanczos import top_eigenvalues
from jacgrad.flow.diagnostics import gradient_flow
from jacgrad.flow.statistics import layer_dense, layer_gram


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


def test_report_forms_each_layers_gram_once_for_norm_and_both_operators(monkeypatch):
    """‖W‖₂ (weight_norm_squared), the matrix-free and the dense layer operator share one WᵀW per
    layer: the report's layer partial forms one Gram GEMM per layer, not up to three."""
    import jacgrad.flow.statistics as flow
    import jacgrad.flow.statistics as ln

    real, memos = ln.small_gram, []

    def counting(W):
        memos.append(1)
        return real(np.asarray(W).view(CountingW))  # counts the GEMMs that form the Gram

    monkeypatch.setattr(flow, "small_gram", counting)
    # tapering widths: H_out <= H_in everywhere, so every operator reads WᵀW; small widths take
    # the dense eigensolve, which (with ‖W‖₂ already from the Gram) is where the old code re-formed it
    net = jg.MLP.init([12, 10, 8, 6], activation="tanh", seed=3)
    x = np.random.default_rng(1).standard_normal((5, 12))
    CountingW.gemms = 0
    report = gradient_flow(net, x)
    assert len(memos) == 3 and CountingW.gemms == 3  # one memo and one WᵀW per layer
    y, cache = net.forward(x)  # and the answer is still ‖J_j‖₂ per sample, against a dense SVD
    chain = net.jacobian_chain(cache)
    for j, row in enumerate(report.layers):
        F = chain.factors[j]
        d = np.broadcast_to(F.d, (5, F.h_out))
        dense = np.stack([np.diag(d[b]) @ np.asarray(F.W).T for b in range(5)])
        np.testing.assert_allclose(row.jacobian_norm, np.linalg.norm(dense, ord=2, axis=(1, 2)).mean(), rtol=1e-6)
