"""Chain against naive per-sample float64 products; bracketing against exhaustive search."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jacgrad as jg
from jacgrad.algebra import bracketing
from jacgrad.algebra.check import check_adjoint, relative_error
from jacgrad.algebra.spectra import ConvergenceWarning


def make_chain(rng, widths, B, shared=(), dtype=np.float64, xp=np):
    """A chain over ``widths`` with per-sample diagonals except the factor indices in ``shared``."""
    factors, dense = [], []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        W = rng.standard_normal((a, b)) / np.sqrt(a)
        d = rng.uniform(0.2, 1.2, size=(b,) if (B is None or k in shared) else (B, b))
        factors.append(jg.LayerJacobian(xp.asarray(d.astype(dtype)), xp.asarray(W.astype(dtype))))
        dense.append(d[..., :, None] * W.T)
    return jg.Chain(factors), dense


def reference_jacobian(dense, B):
    """J_K ⋯ J_1 sample by sample with plain matrix products."""
    if B is None:
        out = dense[0]
        for M in dense[1:]:
            out = M @ out
        return out
    samples = []
    for b in range(B):
        out = dense[0] if dense[0].ndim == 2 else dense[0][b]
        for M in dense[1:]:
            out = (M if M.ndim == 2 else M[b]) @ out
        samples.append(out)
    return np.stack(samples) if samples else np.zeros((0, dense[-1].shape[-2], dense[0].shape[-1]))


CASES = [  # (widths, B, shared factor indices)
    ([6, 5, 4, 3], 4, ()),
    ([3, 8, 8, 2], 1, ()),
    ([1, 4, 4, 1], 3, ()),
    ([12, 12, 2, 12, 12], 5, ()),          # hourglass
    ([7, 3], 2, ()),                        # one factor
    ([5, 6, 4], None, ()),                  # all shared
    ([5, 6, 4, 3], 3, (0, 2)),              # mixed shared / per sample
    ([4, 5, 3], 0, ()),                     # empty batch
]


@pytest.mark.parametrize("widths,B,shared", CASES)
@pytest.mark.parametrize("order", jg.chain.ORDERS)
def test_jacobian_all_orders_match_reference(rng, xp, widths, B, shared, order):
    C, dense = make_chain(rng, widths, B, shared, xp=xp)
    ref = reference_jacobian(dense, B)
    J = C.jacobian(order)
    expected_shape = (widths[-1], widths[0]) if B is None else (B, widths[-1], widths[0])
    assert J.shape == expected_shape == ref.shape
    assert relative_error(J, ref) < 1e-13


@pytest.mark.parametrize("widths,B,shared", CASES)
def test_vjp_jvp_match_reference(rng, xp, widths, B, shared):
    C, dense = make_chain(rng, widths, B, shared, xp=xp)
    ref = reference_jacobian(dense, B)
    n = B if B is not None else 3
    ref_b = ref if B is not None else np.broadcast_to(ref, (n,) + ref.shape)
    v, u = rng.standard_normal((n, widths[-1])), rng.standard_normal((n, widths[0]))
    assert relative_error(C.vjp(xp.asarray(v)), np.einsum("bo,boi->bi", v, ref_b)) < 1e-13
    assert relative_error(C.jvp(xp.asarray(u)), np.einsum("boi,bi->bo", ref_b, u)) < 1e-13
    if n:
        assert check_adjoint(C.jvp, C.vjp, xp.asarray(u), xp.asarray(v)) < 1e-13


def test_float32_chain_stays_float32_and_close_to_float64(rng):
    C64, _ = make_chain(np.random.default_rng(3), [16, 12, 8, 4], 5)
    C32, _ = make_chain(np.random.default_rng(3), [16, 12, 8, 4], 5, dtype=np.float32)
    for order in jg.chain.ORDERS:
        J32 = C32.jacobian(order)
        assert J32.dtype == np.float32
        assert relative_error(J32, C64.jacobian(order)) < 1e-5
    v = rng.standard_normal((5, 4)).astype(np.float32)
    assert C32.vjp(v).dtype == np.float32 and C32.jvp(np.ones((5, 16), np.float32)).dtype == np.float32


# ----------------------------------------------------------------------------- bracketing
def _all_trees(i, j):
    if i == j:
        yield i
        return
    for m in range(i, j):
        for left in _all_trees(m + 1, j):
            for right in _all_trees(i, m):
                yield (left, right)


def _leaves(tree):
    return [tree] if isinstance(tree, int) else _leaves(tree[0]) + _leaves(tree[1])


@pytest.mark.parametrize("seed", range(6))
def test_auto_is_the_cheapest_of_all_bracketings(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 7))
    widths = [int(w) for w in rng.integers(1, 40, size=K + 1)]
    per_sample = [bool(p) for p in rng.integers(0, 2, size=K)]
    B = int(rng.integers(1, 9))
    best = min(bracketing._cost(t, widths, per_sample, B)[2] for t in _all_trees(0, K - 1))
    plan = bracketing.plan("auto", widths, per_sample, B)
    assert plan.cost == best
    assert sorted(_leaves(plan.tree)) == list(range(K))


def test_forward_and_reverse_are_the_two_spines():
    assert bracketing.plan("forward", [2, 3, 4, 5], [True] * 3, 1).tree == (2, (1, 0))
    assert bracketing.plan("reverse", [2, 3, 4, 5], [True] * 3, 1).tree == ((2, 1), 0)


def test_hourglass_auto_splits_at_the_bottleneck(rng):
    widths = [256, 256, 256, 8, 256, 256, 256]
    C, _ = make_chain(rng, widths, 2)
    tree = C.bracketing("auto")
    left, right = tree
    assert sorted(_leaves(right)) == [0, 1, 2]  # input side ends at the 8-wide layer
    assert sorted(_leaves(left)) == [3, 4, 5]
    cost = {o: C.jacobian_cost(o) for o in jg.chain.ORDERS}
    assert cost["auto"] * 10 < min(cost["forward"], cost["reverse"])


def test_tapering_auto_is_never_worse_than_forward_or_reverse(rng):
    C, _ = make_chain(rng, [512, 256, 128, 64, 10], 2)
    cost = {o: C.jacobian_cost(o) for o in jg.chain.ORDERS}
    assert cost["auto"] <= min(cost["forward"], cost["reverse"])
    assert cost["reverse"] < cost["forward"]


def test_deep_chains_do_not_recurse(rng):
    C, dense = make_chain(rng, [3] * 1201, None)
    ref = reference_jacobian(dense, None)
    for order in jg.chain.ORDERS[1:]:
        assert relative_error(C.jacobian(order), ref) < 1e-10


# ----------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("widths,B,shared", [c for c in CASES if c[1] != 0])
def test_singular_values_and_norms(rng, xp, widths, B, shared):
    C, dense = make_chain(rng, widths, B, shared, xp=xp)
    s_ref = np.linalg.svd(reference_jacobian(dense, B), compute_uv=False)
    assert relative_error(C.singular_values(), s_ref) < 1e-12
    assert relative_error(C.spectral_norm(method="exact"), s_ref[..., 0]) < 1e-12
    power = C.spectral_norm(method="power", tol=1e-10, max_iter=20000)
    assert relative_error(power, s_ref[..., 0]) < 1e-6
    lanczos = C.spectral_norm(method="lanczos")
    assert relative_error(lanczos, s_ref[..., 0]) < 1e-10
    bound = jg.to_numpy(C.norm_bound())
    assert bound.shape == s_ref[..., 0].shape
    assert np.all(bound >= s_ref[..., 0] * (1 - 1e-12))


def test_power_iteration_warns_when_it_cannot_converge(rng):
    # A diagonal chain with σ1 = σ2 exactly after a tiny perturbation converges very slowly.
    W = np.diag([1.0, 1.0 - 1e-9, 0.5])
    C = jg.Chain([jg.LayerJacobian(np.ones(3), W)])
    with pytest.warns(ConvergenceWarning):
        C.spectral_norm(method="power", tol=1e-15, max_iter=5)


# ----------------------------------------------------------------------------- bad input
def test_factors_that_do_not_chain_are_named(rng):
    J1 = jg.LayerJacobian(np.ones(4), rng.standard_normal((3, 4)))
    J2 = jg.LayerJacobian(np.ones(2), rng.standard_normal((5, 2)))
    with pytest.raises(ValueError, match=r"factor 1 maps 5 -> 2 features but factor 0 outputs 4"):
        jg.Chain([J1, J2])


def test_batch_mismatch_and_empty_and_non_factors(rng):
    J1 = jg.LayerJacobian(np.ones((3, 4)), rng.standard_normal((3, 4)))
    J2 = jg.LayerJacobian(np.ones((5, 2)), rng.standard_normal((4, 2)))
    with pytest.raises(ValueError, match=r"factor 1 is per sample with B=5 but factor 0 has B=3"):
        jg.Chain([J1, J2])
    with pytest.raises(ValueError, match="at least one"):
        jg.Chain([])
    with pytest.raises(TypeError, match="factor 0 is a ndarray"):
        jg.Chain([np.ones((3, 3))])


def test_unknown_order_and_method_list_the_valid_names(rng):
    C, _ = make_chain(rng, [3, 4, 2], 2)
    with pytest.raises(ValueError, match="auto, forward, reverse"):
        C.jacobian("sideways")
    with pytest.raises(ValueError, match="auto, exact, lanczos, power"):
        C.spectral_norm(method="arnoldi")


def test_wrong_vector_shapes_name_the_chain(rng):
    C, _ = make_chain(rng, [3, 4, 2], 2)
    with pytest.raises(ValueError, match=r"v has shape \(2, 3\) but the chain maps 3 -> 2 features for B=2"):
        C.vjp(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"u has shape \(4, 3\)"):
        C.jvp(np.ones((4, 3)))


@pytest.mark.parametrize("shared", [(), (0, 2)])
def test_rows_selects_samples_without_copying_weights(rng, shared):
    C, _ = make_chain(rng, [5, 6, 4, 3], 6, shared)
    full = C.jacobian()
    for sel in (slice(1, 4), np.array([5, 0, 2])):
        sub = C.rows(sel)
        assert sub.batch == (len(range(6)[sel]) if isinstance(sel, slice) else len(sel))
        assert relative_error(sub.jacobian(), full[sel]) < 1e-15
        assert all(a.W is b.W for a, b in zip(sub.factors, C.factors))


def test_rows_of_an_mlp_chain_keep_the_implicit_diagonal(rng):
    net = jg.MLP.init([4, 7, 3], activation="gelu", seed=2)
    _, cache = net.forward(rng.standard_normal((5, 4)))
    C = net.jacobian_chain(cache)
    assert relative_error(C.rows(slice(2, 5)).jacobian(), C.jacobian()[2:5]) < 1e-15
    assert C.rows(slice(0, 2))[0].activation.name == "gelu"


# ----------------------------------------------------------------------------- properties
@st.composite
def chains(draw):
    K = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 9), min_size=K + 1, max_size=K + 1))
    B = draw(st.one_of(st.none(), st.integers(0, 4)))
    shared = tuple(k for k in range(K) if draw(st.booleans()))
    seed = draw(st.integers(0, 2**32 - 1))
    return widths, B, shared, seed


@settings(max_examples=60, deadline=None)
@given(chains())
def test_every_order_of_every_small_chain_is_the_product(case):
    widths, B, shared, seed = case
    C, dense = make_chain(np.random.default_rng(seed), widths, B, shared)
    ref = reference_jacobian(dense, None if C.batch is None else B)
    for order in jg.chain.ORDERS:
        assert relative_error(C.jacobian(order), ref) < 1e-13
    n = C.batch if C.batch is not None else 2
    rng = np.random.default_rng(seed + 1)
    u, v = rng.standard_normal((n, widths[0])), rng.standard_normal((n, widths[-1]))
    if n:
        # relative to |<v, Ju>|, rounding grows by the cancellation in that sum: Σ|v||Ju| / |<v, Ju>|
        Ju = C.jvp(u)
        cancellation = float(np.abs(v * Ju).sum()) / max(abs(float(np.vdot(v, Ju))), 1e-300)
        assert check_adjoint(C.jvp, C.vjp, u, v) < 1e-13 * max(10.0, cancellation)
