"""The report's per-layer ‖J_j‖₂ on the nets Lanczos finds hardest (orthogonal and near-isometric
layers, whose per-sample spectra are clustered at the top), against dense float64 SVDs: to the
report's accuracy (1e-6), without a ConvergenceWarning, whichever method picked each row."""

import warnings

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import statistics as _layer_norms
from jacgrad.algebra.lanczos import top_eigenvalues
from jacgrad.flow.diagnostics import gradient_flow
from jacgrad.algebra.spectra import ConvergenceWarning

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _dense_layer_norms(net, x):
    """Per layer, the (B,) exact ‖diag(φ'(h)) Wᵀ‖₂ from an independent float64 forward and SVD."""
    z, out = np.asarray(x, dtype=np.float64), []
    for W, b, name in zip(net.weights, net.biases, net.activations):
        act = jg.activations.get(name)
        h = z @ W + b
        J = act.df(h)[:, :, None] * W.T[None]
        out.append(np.linalg.svd(J, compute_uv=False)[:, 0])
        z = act.f(h)
    return out


def _net(kind: str, sizes, seed=0):
    acts = {"tanh": ["tanh"], "relu": ["relu"], "relu,tanh": ["relu", "tanh"]}
    init, act = kind.split("/")
    base = "orthogonal" if init == "near-orthogonal" else init
    net = jg.MLP.init(sizes, activation=acts[act][0], init=base, seed=seed)
    Ws = [W.copy() for W in net.weights]
    if init == "near-orthogonal":  # clustered but not settled by the bounds: Lanczos, then the Gram eigensolve
        rng = np.random.default_rng(seed + 1)
        Ws = [W + 0.01 * rng.standard_normal(W.shape) / np.sqrt(W.shape[0]) for W in Ws]
    names = [acts[act][j % len(acts[act])] for j in range(len(Ws) - 1)] + ["identity"]
    return jg.MLP(Ws, net.biases, names)


@pytest.mark.parametrize(
    "kind, sizes, B",
    [
        ("orthogonal/tanh", [256, 256, 256], 16),  # Lanczos to 1e-12 stopped at 400 steps here
        ("orthogonal/relu,tanh", [200, 256, 256, 128, 10], 8),
        ("near-orthogonal/tanh", [256, 256, 256], 8),
        ("xavier_normal/tanh", [160, 160, 160], 8),
        ("he_normal/relu", [96, 160, 96], 8),
        ("orthogonal/tanh", [40, 120, 80, 10], 8),  # widening first layer: W Wᵀ = I, the H_in side
    ],
)
def test_layer_norms_match_dense_svd_to_1e6_without_warnings(kind, sizes, B):
    net = _net(kind, sizes)
    # small inputs: φ' = 1 − tanh(h)² sits just below 1 for most units, the tightest cluster
    x = 0.1 * np.random.default_rng(1).standard_normal((B, sizes[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        rep = gradient_flow(net, x, spectrum_samples=0)
    for f, ref in zip(rep.layers, _dense_layer_norms(net, x)):
        assert f.jacobian_norm == pytest.approx(ref.mean(), rel=1e-6), f"layer {f.index}"
        assert f.weight_spectral_norm == pytest.approx(np.linalg.norm(net.weights[f.index], 2), rel=1e-6)


def _clustered(P=6, n=200, seed=2):
    """P symmetric PSD operators Q diag(λ) Qᵀ whose top edge is dense (λ = 1 − u², u uniform):
    Lanczos needs about n steps to resolve λ_max to 1e-6 there."""
    rng = np.random.default_rng(seed)
    lam = 1 - rng.random((P, n)) ** 2
    Q = np.linalg.qr(rng.standard_normal((P, n, n)))[0]
    A = Q @ (lam[:, :, None] * np.swapaxes(Q, 1, 2))
    return A, lam.max(axis=1)


def test_rows_lanczos_does_not_settle_go_to_the_dense_eigensolve():
    A, top = _clustered()
    calls = []

    def matvec(v, rows):
        return np.einsum("pij,pj->pi", A[rows], v)

    def dense(rows):
        calls.append(np.asarray(rows).tolist())
        return A[rows]

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got = top_eigenvalues(matvec, len(A), A.shape[1], xp=np, dtype=np.float64, tol=1e-6, dense=dense)
    np.testing.assert_allclose(got, top, rtol=1e-6)
    assert calls and sum(len(c) for c in calls) <= len(A)
    # without the dense operators the same budget ends in the warning and a lower bound
    with pytest.warns(ConvergenceWarning, match="lower bound"):
        low = top_eigenvalues(matvec, len(A), A.shape[1], xp=np, dtype=np.float64, tol=1e-12, max_steps=60)
    assert (low <= top * (1 + 1e-12)).all()


def test_rows_whose_bounds_meet_need_no_matvec():
    # diag(d)·Qᵀ with Q orthogonal: ‖J‖₂² = max d², and both bounds equal it
    rng = np.random.default_rng(3)
    n, B = 300, 5
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    d = rng.random((B, n))
    calls = []

    def matvec(v, rows):
        calls.append(rows)
        return ((v * d[rows]) @ (Q.T @ Q)) * d[rows]

    col2 = (Q * Q).sum(axis=0)
    lower = (d**2 * col2).max(axis=1)
    upper = (d**2).max(axis=1) * np.linalg.norm(Q, 2) ** 2
    got = top_eigenvalues(matvec, B, n, xp=np, dtype=np.float64, tol=1e-6, lower=lower, upper=upper)
    np.testing.assert_allclose(np.sqrt(got), np.linalg.svd(d[:, :, None] * Q.T[None], compute_uv=False)[:, 0],
                               rtol=1e-6)
    assert calls == []


def test_small_layers_use_one_batched_eigensolve():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((30, 20))
    d = rng.random((7, 20))
    J = jg.LayerJacobian(d, W)
    calls = []
    matvec = _layer_norms.layer_gram(np, J, d)

    def counted(v, rows):
        calls.append(rows)
        return matvec(v, rows)

    got = top_eigenvalues(counted, 7, 20, xp=np, dtype=np.float64, tol=1e-6, dense=_layer_norms.layer_dense(np, J, d))
    np.testing.assert_allclose(np.sqrt(got), np.linalg.svd(J.dense(), compute_uv=False)[:, 0], rtol=1e-12)
    assert calls == []


@pytest.mark.parametrize("rel", [1e-6, 1e-12])
def test_multisection_brackets_the_top_eigenvalue_of_tridiagonals(rel):
    from jacgrad.algebra.tridiagonal import _top_eigenvalue_bounded

    rng = np.random.default_rng(5)
    P, k = 40, 30
    a = rng.random((P, k)) * rng.choice([1e-3, 1.0, 1e3], size=(P, 1))
    b = rng.standard_normal((P, k - 1)) * a[:, :1]
    T = np.zeros((P, k, k))
    i = np.arange(k)
    T[:, i, i], T[:, i[:-1], i[1:]], T[:, i[1:], i[:-1]] = a, b, b
    lam = np.linalg.eigvalsh(T)[:, -1]
    got = _top_eigenvalue_bounded(a, b, np.zeros(P), rel)
    assert (got <= lam * (1 + 1e-13)).all() and (lam <= got * (1 + rel) * (1 + 1e-13)).all()


def test_float32_orthogonal_report_is_quiet_and_agrees_with_float64():
    net = _net("orthogonal/tanh", [128, 128, 128, 128])
    net32 = jg.MLP([W.astype(np.float32) for W in net.weights], [b.astype(np.float32) for b in net.biases],
                   net.activations)
    x = 0.1 * np.random.default_rng(6).standard_normal((16, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        r32 = gradient_flow(net32, x.astype(np.float32), spectrum_samples=0)
    for f, ref in zip(r32.layers, _dense_layer_norms(net, x)):
        assert f.jacobian_norm == pytest.approx(ref.mean(), rel=1e-5)
