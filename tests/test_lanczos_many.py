"""``top_eigenvalues_many``: several sets of operators in one Lanczos block give each set, bit for
bit, what its own ``top_eigenvalues`` call gives; and the report's layers measured together
(``statistics.measure_norms``) equal each layer measured alone."""

import warnings

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra import lanczos
from jacgrad.algebra.lanczos import Operators, top_eigenvalues, top_eigenvalues_many
from jacgrad.flow import statistics


def _psd_sets(dtype, n=96):
    """Sets of per-row operators diag(s_b) G diag(s_b), with bounds, dense forms, a low-rank one
    (its Krylov space goes invariant: a breakdown), one without a dense form (another budget)."""
    rng = np.random.default_rng(0)
    sets, mats = [], []
    for k, (rows, rank, bounds, dense) in enumerate([(5, n, True, True), (3, 4, False, True), (1, n, False, True),
                                                     (4, n, True, False), (2, 2, False, False)]):
        A = rng.standard_normal((n, rank)).astype(dtype)
        G = A @ A.T
        s = (rng.random((rows, n)) > 0.3).astype(dtype)
        if bounds:
            s[0] = 0.0
            s[0, 7] = 1.0  # one active unit: lower = upper, settled before any step
        M = s[:, :, None] * G[None] * s[:, None, :]
        col = np.einsum("bii->bi", M).max(axis=1).astype(np.float64)
        upper = np.full(rows, np.linalg.eigvalsh(G.astype(np.float64))[-1] * 1.0001) if bounds else None
        sets.append(Operators(lambda v, r, G=G, s=s: ((v * s[r]) @ G) * s[r], rows, 10 + k,
                              col if bounds else None, upper, (lambda r, M=M: M[r]) if dense else None))
        mats.append(M)
    return sets, mats


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("row_elements", [None, 96 * 4])  # one block, or blocks of 4 rows (sets split and packed)
def test_many_equals_each_call_bit_for_bit(monkeypatch, dtype, row_elements):
    if row_elements is not None:
        monkeypatch.setattr(lanczos, "ROW_ELEMENTS", row_elements)
    sets, mats = _psd_sets(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = [top_eigenvalues(o.matvec, o.count, 96, xp=np, dtype=dtype, seed=o.seed, lower=o.lower, upper=o.upper,
                                 dense=o.dense) for o in sets]
        together = top_eigenvalues_many(sets, 96, xp=np, dtype=dtype)
    for a, t, M in zip(alone, together, mats):
        assert a.dtype == t.dtype == np.float64 and np.array_equal(a, t)
        exact = np.linalg.eigvalsh(M.astype(np.float64))[:, -1]  # and both are the answer
        np.testing.assert_allclose(t, exact, rtol=1e-4 if dtype == np.float32 else 1e-9, atol=1e-6 * exact.max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_set_whose_krylov_space_goes_invariant_is_exact_on_its_own(dtype):
    """A rank-5 operator with a well separated top eigenvalue breaks down at step 5, next to a
    full-rank set that does not: its rows are exact at the next check (the dense top of T), as in
    its own call, not a Ritz value from step 4 that the Sturm test would accept."""
    rng = np.random.default_rng(1)
    n = 96
    U = np.linalg.qr(rng.standard_normal((n, 5)))[0]
    low = ((U * [10.0, 1.0, 0.9, 0.8, 0.7]) @ U.T).astype(dtype)
    A = rng.standard_normal((n, n)).astype(dtype)
    full = A @ A.T
    sets = [Operators(lambda v, r, G=G: v @ G, rows, seed, dense=lambda r, G=G: np.broadcast_to(G, (len(r), n, n)))
            for G, rows, seed in ((low, 3, 0), (full, 2, 1))]
    alone = [top_eigenvalues(o.matvec, o.count, n, xp=np, dtype=dtype, seed=o.seed, dense=o.dense) for o in sets]
    together = top_eigenvalues_many(sets, n, xp=np, dtype=dtype)
    for a, t in zip(alone, together):
        assert np.array_equal(a, t)
    np.testing.assert_allclose(together[0], 10.0, rtol=1e-6)


def test_many_warns_per_set_that_does_not_settle():
    sets, _ = _psd_sets(np.float64)
    free = [o for o in sets if o.dense is None]  # no dense fallback: stopped at max_steps, a lower bound
    with pytest.warns(lanczos.ConvergenceWarning, match=r"of 4 operators") as caught:
        got = top_eigenvalues_many(free, 96, xp=np, dtype=np.float64, max_steps=3)
    assert all("Lanczos stopped at 3 steps" in str(w.message) for w in caught)
    assert [g.shape for g in got] == [(4,), (2,)]


def test_many_of_nothing():
    assert [g.shape for g in top_eigenvalues_many([Operators(None, 3)], 0, xp=np, dtype=np.float64)] == [(3,)]
    assert top_eigenvalues_many([], 5, xp=np, dtype=np.float64) == []


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layers_measured_together_equal_each_alone(dtype):
    """The report measures every Dense's ‖W‖₂ and per-sample ‖J‖₂ in one block per width; each
    layer's numbers are those of its own layer_partial."""
    net = jg.MLP.init([80, 72, 72, 40, 72], activation="tanh", seed=4, dtype=dtype)
    x = np.random.default_rng(5).standard_normal((12, 80)).astype(dtype)
    y, cache = net.forward(x)
    g = net.backward(cache, np.ones_like(y))
    chain = net.jacobian_chain(cache)
    sel = np.array([1, 4, 5, 9])
    args = [(np, j, F, net.activations[j], g, 1.0, 3, False, sel) for j, F in enumerate(chain.factors)]
    together = [statistics.layer_sums(*a) for a in args]
    statistics.measure_norms(np, together)
    for a, t in zip(args, together):
        one = statistics.layer_partial(*a)
        assert "_norms" not in t and "_norms" not in one
        for key in ("w2", "norm_sum", "bound_sum", "fro2_sum", "d_sum"):
            assert one[key] == t[key] and np.isfinite(t[key]), key


def _layer(W, d, seed):
    """A layer's two calls as the report makes them: ‖W‖₂² (one operator) and the per-sample
    J_b J_bᵀ bounded by max_i d_i²‖W[:, i]‖² and max d_b² · ‖W‖₂² (``bound_by`` the first)."""
    J = jg.LayerJacobian(d, W)
    gram = statistics.small_gram(W)
    col2 = (W * W).sum(axis=0).astype(np.float64)
    d2 = (d * d).astype(np.float64)
    return (statistics._weight_operators(W, seed, gram),
            Operators(statistics.layer_gram(np, J, d, gram), len(d), seed, (d2 * col2).max(axis=1), d2.max(axis=1),
                      statistics.layer_dense(np, J, d, gram)))


def _layers(kind, dtype, n=96, B=6):
    rng = np.random.default_rng(7)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    d = np.tanh(rng.standard_normal((B, n))) ** 2
    d[0] = 1.0  # J_0 J_0ᵀ = WᵀW: its θ meets the bound max d² · ‖W‖₂²
    d[1] = (rng.random(n) > 0.5)
    if kind == "random":
        W = rng.standard_normal((2 * n, n)) / np.sqrt(n)
    elif kind == "scaled orthogonal":  # G = diag(c²): rows whose largest d meets the largest c settle at once
        c = np.linspace(1.0, 2.0, n)
        W = Q * c
        d[2] = 0.2
        d[2, -1] = 1.0
    else:  # "near isometry": a dense top edge, left to the dense eigensolve at n // 2 steps
        W = Q + 1e-4 * rng.standard_normal((n, n))
    return W.astype(dtype), d.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bound_by_in_one_block_equals_the_calls_one_after_the_other(monkeypatch, dtype):
    """Three layers' ‖W‖₂² and per-sample ‖J_b‖₂² in one call (the bounds deferred until each
    ‖W‖₂² settles) equal ‖W‖₂² first, then each batch with its bound: bit for bit, whether a row
    meets its bound, settles before any step (that call runs again on its own) or is left to
    the dense eigensolve with its ‖W‖₂²."""
    pairs = [_layer(*_layers(kind, dtype), seed) for seed, kind in
             enumerate(("random", "scaled orthogonal", "near isometry"))]
    sets = []
    for w, J in pairs:
        sets += [w, Operators(J.matvec, J.count, J.seed, J.lower, J.upper, J.dense, bound_by=len(sets))]
    blocks = []
    real = lanczos._lanczos
    monkeypatch.setattr(lanczos, "_lanczos", lambda *a, **k: blocks.append(a[2].shape[0]) or real(*a, **k))
    together = top_eigenvalues_many(sets, 96, xp=np, dtype=dtype, tol=statistics.report_tol(dtype))
    assert blocks[0] == 3 + 3 * 6 and len(blocks) == 2  # one block, and the orthogonal layer's batch again
    for (w, J), got_w, got_J in zip(pairs, together[0::2], together[1::2]):
        tol = statistics.report_tol(dtype)
        w_alone = top_eigenvalues(w.matvec, 1, 96, xp=np, dtype=dtype, seed=w.seed, tol=tol, dense=w.dense)
        J_alone = top_eigenvalues(J.matvec, J.count, 96, xp=np, dtype=dtype, seed=J.seed, tol=tol, lower=J.lower,
                                  upper=J.upper * w_alone[0], dense=J.dense)
        assert np.array_equal(got_w, w_alone) and np.array_equal(got_J, J_alone)
        exact = np.linalg.eigvalsh(J.dense(np.arange(J.count)).astype(np.float64))[:, -1]
        np.testing.assert_allclose(got_J, exact, rtol=3 * tol)  # and both are ‖J_b‖₂² to the report's accuracy


def test_bound_by_names_a_set_of_one_operator():
    w, J = _layer(*_layers("random", np.float64), 0)
    bad = Operators(J.matvec, J.count, 0, J.lower, J.upper, J.dense, bound_by=1)
    with pytest.raises(ValueError, match="bound_by=1"):
        top_eigenvalues_many([bad, bad], 96, xp=np, dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bound_by_a_slow_operator(dtype):
    """The bounding operator A has a dense top edge (slow: in float64 left to its dense eigensolve),
    the bounded B (rank 12, top 2) meets its bound ``2 · λ_max(A)`` long before A settles and
    breaks down later: its rows end where their own call, knowing the bound, ends them."""
    n, rng = 96, np.random.default_rng(12)
    a = 1.0 - 1e-3 * rng.random(n)
    a[0] = 1.0
    b = np.zeros(n)
    b[:12] = np.linspace(0.2, 0.5, 12)
    b[0] = 2.0
    A, B = np.diag(a).astype(dtype), np.diag(b).astype(dtype)
    sets = [Operators(lambda v, r: v @ A, 1, 0, dense=lambda r: A[None]),
            Operators(lambda v, r: v @ B, 2, 5, None, np.full(2, 2.0), lambda r: np.broadcast_to(B, (len(r), n, n)),
                      bound_by=0)]
    together = top_eigenvalues_many(sets, n, xp=np, dtype=dtype)
    first = top_eigenvalues(sets[0].matvec, 1, n, xp=np, dtype=dtype, seed=0, dense=sets[0].dense)
    then = top_eigenvalues(sets[1].matvec, 2, n, xp=np, dtype=dtype, seed=5, upper=np.full(2, 2.0) * first[0],
                           dense=sets[1].dense)
    assert np.array_equal(together[0], first) and np.array_equal(together[1], then)
    np.testing.assert_allclose(together[1], 2.0, rtol=1e-5)
