"""The leaf algebra of ``jacgrad.protocol.leaves`` on its own, against per-sample gradients built
explicitly in float64 NumPy (one sample, one output row at a time): squared norms (every method,
and only some arrays counted), filled gradients, the clipped sum, the NTK term (cross-Gram and
instantiated), the parameter JVP and the GGN diagonal — with T > 1 tokens, T = 1 given as
(B, 1, ·), and the 2-D (B, ·) case."""

import numpy as np
import pytest

from jacgrad.protocol.leaves import ElementwiseLeaf, TokenDenseLeaf, check_method, gram_is_cheaper

B, R, p, d = 3, 2, 4, 5
LEAVES = [("dense", True), ("dense", False), ("elementwise", True), ("elementwise", False)]


def _leaf(kind, bias):
    return TokenDenseLeaf(bias) if kind == "dense" else ElementwiseLeaf(bias)


def _case(kind, T, seed=0):
    rng = np.random.default_rng(seed)
    width = p if kind == "dense" else d
    lead = (B,) if T is None else (B, T)
    a = rng.standard_normal(lead + (width,))
    delta = rng.standard_normal(lead + (d,))
    G = rng.standard_normal((B, R) + lead[1:] + (d,))
    return a, delta, G


def _tok(x):
    """(N, [T,] n) -> (N, T, n)."""
    return x if x.ndim == 3 else x[:, None]


def _grad(kind, bias, a, delta):
    """One sample's gradient arrays from a: (T, p), delta: (T, d), built by loops."""
    if kind == "dense":
        W = sum(np.outer(a[t], delta[t]) for t in range(a.shape[0]))
    else:
        W = sum(a[t] * delta[t] for t in range(a.shape[0]))
    return [W, delta.sum(axis=0)] if bias else [W]


def _flat(arrays):
    return np.concatenate([x.ravel() for x in arrays])


def _views(kind, bias, lead=()):
    shapes = [(p, d) if kind == "dense" else (d,)] + ([(d,)] if bias else [])
    return [np.zeros(lead + s) for s in shapes]


@pytest.mark.parametrize("T", [None, 1, 6])
@pytest.mark.parametrize("kind,bias", LEAVES)
def test_norms_fill_and_clipped_sum(kind, bias, T):
    leaf = _leaf(kind, bias)
    a, delta, _ = _case(kind, T)
    g = [_grad(kind, bias, _tok(a)[i], _tok(delta)[i]) for i in range(B)]
    want = np.array([np.sum(_flat(gi) ** 2) for gi in g])
    for method in ("auto", "gram", "instantiate"):
        np.testing.assert_allclose(leaf.sq_norms(a, delta, method=method), want, rtol=1e-12)
    if bias:  # only the first array counted, then only the second
        np.testing.assert_allclose(leaf.sq_norms(a, delta, [True, False]), [np.sum(gi[0] ** 2) for gi in g], rtol=1e-12)
        np.testing.assert_allclose(leaf.sq_norms(a, delta, [False, True]), [np.sum(gi[1] ** 2) for gi in g], rtol=1e-12)
    views = _views(kind, bias, (B,))
    leaf.fill(views, a, delta)
    for k, v in enumerate(views):
        np.testing.assert_allclose(v, np.stack([gi[k] for gi in g]), rtol=1e-12, atol=1e-14)
    c = np.array([1.0, 0.5, 0.25])
    sums = _views(kind, bias)
    leaf.clipped_sum(sums, a, delta.copy(), c)
    for k, v in enumerate(sums):
        np.testing.assert_allclose(v, sum(ci * gi[k] for ci, gi in zip(c, g)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("T", [None, 1, 6])
@pytest.mark.parametrize("kind,bias", LEAVES)
def test_ntk_jvp_and_ggn_diagonal(kind, bias, T):
    leaf = _leaf(kind, bias)
    a, _, G = _case(kind, T, seed=1)
    a2, _, G2 = _case(kind, T, seed=2)
    Gt = G if T is not None else G[:, :, None]
    G2t = G2 if T is not None else G2[:, :, None]
    J = np.stack([[_flat(_grad(kind, bias, _tok(a)[i], Gt[i, o])) for o in range(R)] for i in range(B)])
    J2 = np.stack([[_flat(_grad(kind, bias, _tok(a2)[i], G2t[i, o])) for o in range(R)] for i in range(B)])
    methods = ("auto", "gram", "instantiate") if kind == "dense" else ("auto",)
    for method in methods:
        for trace in (False, True):
            out = np.zeros((B, B) if trace else (B, R, B, R))
            leaf.ntk_add((a, G), (a2, G2), trace, out, method=method)
            want = np.einsum("iop,jop->ij", J, J2) if trace else np.einsum("iop,jqp->iojq", J, J2)
            np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    # the JVP: per sample, the tangent at the leaf's output point of a parameter direction
    rng = np.random.default_rng(3)
    v = [rng.standard_normal(x.shape) for x in _views(kind, bias)]
    base = rng.standard_normal(a.shape[:-1] + (d,))
    got = leaf.jvp(a, v, base)
    lin = (a @ v[0]) if kind == "dense" else (a * v[0])
    np.testing.assert_allclose(got, lin + base + (v[1] if bias else 0), rtol=1e-12)
    # the GGN diagonal: Σ_i Σ_ρ (∂(G_iρ · h)/∂θ)², scaled
    outs = _views(kind, bias)
    leaf.ggn_diag_add(outs, a, G, 0.5)
    np.testing.assert_allclose(_flat(outs), 0.5 * (J ** 2).sum(axis=(0, 1)), rtol=1e-12, atol=1e-14)


def test_cost_rule_and_method_names():
    assert gram_is_cheaper(4, 4, 8) and not gram_is_cheaper(5, 4, 8)  # 2T² ≤ p·d: 32 ≤ 32, 50 > 32
    assert check_method("gram") == "gram"
    with pytest.raises(ValueError, match=r"method='fast'.*valid: auto, gram, instantiate"):
        check_method("fast")
    with pytest.raises(ValueError, match=r"method=None"):
        check_method(None)
