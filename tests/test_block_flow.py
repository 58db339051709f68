"""block_flow rows against dense NumPy references: chi = ‖J‖_F²/h_out (the MLP report's χ), ‖J‖₂, the residual bound
1 + s·max|d|·‖W‖₂, and the Hutchinson path of large blocks."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import block_flow as bf

L = jg.layers


def _net(rng, n=5, s=0.3):
    W1, W2 = rng.standard_normal((n, n)), rng.standard_normal((n, n)) / np.sqrt(n)
    gamma = 1 + 0.3 * rng.standard_normal(n)
    return jg.Sequential([L.Residual([L.Dense(W1, None, "tanh")], scale=s), L.LayerNorm(gamma, np.zeros(n)),
                          L.Dense(W2, None, "identity")]), W1, W2, gamma


def test_rows_match_dense_references():
    rng = np.random.default_rng(0)
    net, W1, W2, gamma = _net(rng)
    x = rng.standard_normal((4, 5))
    rows = bf.block_flow(net, x)
    assert [r.kind for r in rows] == ["residual", "layernorm", "dense"]
    # block 0: J = I + s·diag(1 - tanh²(x W1)) W1ᵀ, per sample, formed densely here
    d = 1 - np.tanh(x @ W1) ** 2
    J0 = np.eye(5) + 0.3 * d[:, :, None] * W1.T[None]
    assert rows[0].chi == pytest.approx((J0 ** 2).sum(axis=(1, 2)).mean() / 5, rel=1e-12)
    assert rows[0].jacobian_norm == pytest.approx(np.linalg.svd(J0, compute_uv=False)[:, 0].mean(), rel=1e-10)
    want_bound = (1 + 0.3 * np.abs(d).max(1) * np.linalg.norm(W1, 2)).mean()
    assert rows[0].jacobian_bound == pytest.approx(want_bound, rel=1e-12)
    assert rows[0].scale == 0.3 and rows[1].scale is None
    # block 1: LayerNorm by central differences of its input z = x + s·tanh(x W1)
    z = x + 0.3 * np.tanh(x @ W1)
    ln = lambda a: gamma * (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)
    eps = 1e-6
    J1 = np.stack([(ln(z + eps * e) - ln(z - eps * e)) / (2 * eps) for e in np.eye(5)], axis=2)
    assert rows[1].chi == pytest.approx((J1 ** 2).sum(axis=(1, 2)).mean() / 5, rel=1e-6)
    assert rows[1].jacobian_bound == pytest.approx((np.abs(gamma).max() / np.sqrt(z.var(1) + 1e-5)).mean(), rel=1e-12)
    for r in rows:
        assert r.jacobian_bound >= r.jacobian_norm - 1e-12 and r.chi_exact
    # gradient norms: the parameter blocks of backward, by layer
    _, g = net.loss_and_grads(x, np.zeros((4, 5)))
    assert rows[2].grad_norm == pytest.approx(np.sqrt((g.layers[2]["W"] ** 2).sum() + (g.layers[2]["b"] ** 2).sum()))


def test_large_blocks_estimate_chi_and_use_lanczos(monkeypatch):
    rng = np.random.default_rng(1)
    net, *_ = _net(rng, n=6)
    x = rng.standard_normal((3, 6))
    exact = bf.block_flow(net, x)
    monkeypatch.setattr(bf, "EXACT_ELEMENTS", 0)
    monkeypatch.setattr(bf, "PROBES", 4000)
    est = bf.block_flow(net, x)
    for a, b in zip(exact, est):
        assert not b.chi_exact
        assert b.chi == pytest.approx(a.chi, rel=0.1)
        assert b.jacobian_norm == pytest.approx(a.jacobian_norm, rel=1e-8)


def test_block_flow_needs_a_sequential_and_an_mlp_is_one():
    """An MLP is a Sequential of Dense layers (issue 19): its rows are those of that Sequential."""
    with pytest.raises(TypeError, match="block_flow needs a jacgrad network"):
        bf.block_flow([np.ones((2, 2))], np.ones((1, 2)))
    mlp = jg.MLP.init([3, 4, 2], activation="gelu", seed=0, bias_std=0.1)
    seq = jg.Sequential([jg.layers.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    x = np.random.default_rng(0).standard_normal((5, 3))
    got, want = bf.block_flow(mlp, x), bf.block_flow(seq, x)
    assert [vars(r) if hasattr(r, "__dict__") else r for r in got] == [vars(r) if hasattr(r, "__dict__") else r
                                                                         for r in want]


def test_chi_is_the_mlp_reports_on_a_narrowing_net():
    """One χ definition: a Dense-only Sequential of a narrowing net gives the MLP report's χ column
    (‖J_j‖_F²/H_j, the layer's OUTPUT width), checked against dense Jacobians formed here."""
    mlp = jg.MLP.init([12, 7, 3], activation="tanh", seed=2)
    seq = jg.Sequential([jg.layers.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    x = np.random.default_rng(1).standard_normal((6, 12))
    rows = bf.block_flow(seq, x)
    h1 = x @ mlp.weights[0] + mlp.biases[0]
    J0 = (1 - np.tanh(h1) ** 2)[:, :, None] * mlp.weights[0].T[None]                # (B, 7, 12)
    J1 = np.broadcast_to(mlp.weights[1].T, (6, 3, 7))                                 # identity output
    for row, J in zip(rows, (J0, J1)):
        assert row.chi == pytest.approx((J ** 2).sum(axis=(1, 2)).mean() / J.shape[1], rel=1e-12)
    rep = jg.diagnostics.gradient_flow(mlp, x)
    assert [r.chi for r in rows] == pytest.approx([L.chi for L in rep.layers], rel=1e-12)
