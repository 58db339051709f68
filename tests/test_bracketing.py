"""Chain bracketing: "auto" against an exhaustive search written here, independently of
jacgrad.algebra.bracketing (its own tree enumerator and its own cost model); deep chains and deep trees
without recursion."""

import sys

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra import bracketing
from jacgrad.algebra.check import relative_error


def all_bracketings(i, j):
    """Every binary tree over the factors i..j, as (left = output side, right = input side)."""
    if i == j:
        return [i]
    return [(left, right) for m in range(i, j)
            for left in all_bracketings(m + 1, j) for right in all_bracketings(i, m)]


def price(tree, widths, per_sample, B):
    """Multiply-adds of a tree, from first principles: a product of the sub-products over
    factors [a..m] (input side) and [m+1..c] is a (w[c+1] x w[m+1]) @ (w[m+1] x w[a]) GEMM,
    done once per sample if any factor in [a..c] has a per-sample diagonal, once otherwise.
    Returns (first factor, last factor, cost)."""
    if isinstance(tree, int):
        return tree, tree, 0
    la, lc, lcost = price(tree[0], widths, per_sample, B)
    ra, rc, rcost = price(tree[1], widths, per_sample, B)
    assert rc + 1 == la, "the left operand must continue where the right one ends"
    times = B if any(per_sample[ra:lc + 1]) else 1
    return ra, lc, lcost + rcost + times * widths[lc + 1] * widths[la] * widths[ra]


def leaves(tree):
    out, stack = [], [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, int):
            out.append(n)
        else:
            stack += [n[1], n[0]]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_auto_is_optimal_against_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 9))
    widths = [int(w) for w in rng.integers(1, 60, size=K + 1)]
    mix = seed % 3  # all per sample, all shared, or a random mix
    per_sample = [True] * K if mix == 0 else [False] * K if mix == 1 else [bool(p) for p in rng.integers(0, 2, K)]
    B = int(rng.integers(1, 40))
    best = min(price(t, widths, per_sample, B)[2] for t in all_bracketings(0, K - 1))
    plan = bracketing.plan("auto", widths, per_sample, B)
    assert sorted(leaves(plan.tree)) == list(range(K))
    assert price(plan.tree, widths, per_sample, B)[2] == best
    assert plan.cost == best


def test_costs_above_2_to_53_still_pick_the_optimum():
    # float64 costs: wide layers and a big batch, the optimum still found exactly here
    widths, per_sample, B = [40000, 30000, 50000, 20, 45000], [True, False, True, True], 10**6
    best = min(price(t, widths, per_sample, B)[2] for t in all_bracketings(0, 3))
    assert best > 2**53
    assert bracketing.plan("auto", widths, per_sample, B).cost == best


@pytest.mark.parametrize("K", [1300])
@pytest.mark.parametrize("shape", ["uniform", "tapering", "expanding", "hourglass", "random"])
def test_beyond_the_exact_limit_auto_is_never_worse_than_forward_or_reverse(K, shape):
    rng = np.random.default_rng(K)
    widths = {"uniform": [784] + [4] * (K - 1) + [10],
              "tapering": list(range(K + 8, 7, -1)),
              "expanding": list(range(3, K + 4)),
              "hourglass": [64] * (K // 2) + [3] + [64] * (K - K // 2),
              "random": [int(w) for w in rng.integers(1, 100, K + 1)]}[shape]
    per_sample = [bool(p) for p in rng.integers(0, 2, K)] if shape == "random" else [True] * K
    assert K > bracketing.EXACT_LIMIT
    auto = bracketing.plan("auto", widths, per_sample, 16)
    assert sorted(leaves(auto.tree)) == list(range(K))
    fwd, rev = (bracketing.plan(o, widths, per_sample, 16).cost for o in ("forward", "reverse"))
    assert auto.cost <= min(fwd, rev)
    if shape == "hourglass":  # the fan through the bottleneck: far below both spines
        assert auto.cost * 10 < min(fwd, rev)


def test_the_exact_dp_and_the_large_chain_plan_agree_on_typical_shapes(monkeypatch):
    # The heuristic used beyond EXACT_LIMIT, run where the exact answer is known.
    K = 150
    cases = [[784] + [32] * (K - 1) + [10], list(range(K + 5, 4, -1)),
             [64] * (K // 2) + [3] + [64] * (K - K // 2),
             [64] * 50 + [4] + [64] * 50 + [8] + [64] * (K - 101)]
    exact = [bracketing.plan("auto", w, [True] * K, 8).cost for w in cases]
    monkeypatch.setattr(bracketing, "EXACT_LIMIT", 40)
    bracketing._plan.cache_clear()
    try:
        for w, best in zip(cases, exact):
            assert bracketing.plan("auto", w, [True] * K, 8).cost == best
    finally:
        bracketing._plan.cache_clear()


@pytest.mark.parametrize("seed", range(4))
def test_blocked_plan_prices_its_own_tree(seed, monkeypatch):
    # The blocked DP (beyond EXACT_LIMIT) carries each block's cost into the DP over blocks as a
    # leaf cost, and re-blocks blocks that are still too long: its claimed cost must be the
    # independent price of the tree it returns, over every factor exactly once.
    monkeypatch.setattr(bracketing, "EXACT_LIMIT", 5)
    monkeypatch.setattr(bracketing, "_BLOCKS", 4)
    monkeypatch.setattr(bracketing, "_BLOCK_CAP", 9)
    rng = np.random.default_rng(seed)
    K = 60
    widths = [int(w) for w in rng.integers(1, 50, K + 1)]
    per_sample = [bool(p) for p in rng.integers(0, 2, K)]
    tree, cost = bracketing._blocked_tree(widths, per_sample, 7)
    assert sorted(leaves(tree)) == list(range(K))
    assert cost == price(tree, widths, per_sample, 7)[2]


def _recursion_room(extra):
    """A recursion limit only ``extra`` frames above the current depth."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth + extra


def make_chain(rng, widths, B=None):
    factors, dense = [], []
    for a, b in zip(widths[:-1], widths[1:]):
        W = rng.standard_normal((a, b)) / np.sqrt(a)
        d = rng.uniform(0.5, 1.5, size=(b,) if B is None else (B, b))
        factors.append(jg.LayerJacobian(d, W))
        dense.append(d[..., :, None] * W.T)
    return jg.Chain(factors), dense


def test_deep_auto_plans_and_zigzag_trees_need_no_recursion(rng, monkeypatch):
    # Widths 2, 3, 3, …: the one optimal tree is the forward spine (every product through the
    # width-2 input: 2·3·3 each, any other product 3·3·3), K deep. A zigzag tree (factors added
    # alternately on the output and the input side) defeats spine peeling: K deep as well.
    K = 301
    C, dense = make_chain(rng, [2] + [3] * K)
    ref = dense[0]
    for M in dense[1:]:
        ref = M @ ref
    c = K // 2
    zigzag = c
    for step in range(1, K):
        k = c + (step + 1) // 2 if step % 2 else c - step // 2
        zigzag = (k, zigzag) if k > c else (zigzag, k)
    assert sorted(leaves(zigzag)) == list(range(K))
    bracketing._plan.cache_clear()
    monkeypatch.setattr(sys, "getrecursionlimit", sys.getrecursionlimit)  # restored by monkeypatch
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(_recursion_room(150))
    try:
        tree = C.bracketing("auto")
        J = C.jacobian("auto")
        Jz = bracketing.evaluate(zigzag, C.factors, transposed=False)
        cost_z = bracketing._cost(zigzag, C.widths, [False] * K, 1)[2]
    finally:
        sys.setrecursionlimit(old)
    assert leaves(tree) == list(range(K - 1, -1, -1))  # the forward spine
    assert relative_error(J, ref) < 1e-10 and relative_error(Jz, ref) < 1e-10
    assert cost_z == price_iter(zigzag, C.widths)


def price_iter(tree, w):
    """Shared-diagonal cost of a deep tree, post-order without recursion (the test's own)."""
    span, stack, total = {}, [tree], 0
    while stack:
        n = stack[-1]
        if isinstance(n, int):
            span[id(n)] = (n, n)
            stack.pop()
        elif id(n[0]) in span and id(n[1]) in span:
            (la, lc), (ra, rc) = span[id(n[0])], span[id(n[1])]
            total += w[lc + 1] * w[la] * w[ra]
            span[id(n)] = (ra, lc)
            stack.pop()
        else:
            stack += [n[0], n[1]]
    return total


def test_ten_thousand_factors_plan_and_evaluate(rng):
    # 5 -> 3 -> ... -> 3 -> 2 through orthogonal 3x3 layers: the product stays O(1).
    K = 10_000
    Q = np.linalg.qr(rng.standard_normal((K - 2, 3, 3)))[0]
    factors = ([jg.LayerJacobian(np.ones(3), rng.standard_normal((5, 3)))]
               + [jg.LayerJacobian(np.ones(3), q) for q in Q]
               + [jg.LayerJacobian(np.ones(2), rng.standard_normal((3, 2)))])
    C = jg.Chain(factors)
    J = C.jacobian("auto")
    ref = factors[0].W.T
    for q in Q:  # J_k = Qᵀ for a factor with W = Q and d = 1
        ref = q.T @ ref
    ref = factors[-1].W.T @ ref
    assert J.shape == (2, 5) and relative_error(J, ref) < 1e-9
    assert C.jacobian_cost("auto") <= min(C.jacobian_cost("forward"), C.jacobian_cost("reverse"))


def test_gradient_flow_of_a_net_deeper_than_the_recursion_limit():
    # `jacgrad report --depth 1000 --width 4` died in bracketing with RecursionError: the
    # report's per-sample Jacobians go through Chain.jacobian("auto").
    depth = sys.getrecursionlimit() + 100
    net = jg.MLP.init([3] * (depth + 1), activation="tanh", seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3))
    report = jg.diagnostics.gradient_flow(net, x)
    assert len(report.layers) == depth
    assert report.jacobian_singular_values.shape == (2, 3)


@pytest.mark.parametrize("seed", range(6))
def test_peak_elements_is_the_largest_array_evaluate_forms(monkeypatch, seed):
    """Every bracketing of a small chain of per-sample dense factors, evaluated with the arrays it
    forms recorded (GEMM results, dense leaves): peak_elements is the largest, per sample (the
    report's spectrum sizes its chunks of samples by it)."""
    from jacgrad.algebra import bracket_evaluate

    rng = np.random.default_rng(seed)
    K, B = int(rng.integers(1, 5)), 2
    widths = [int(v) for v in rng.integers(1, 9, size=K + 1)]
    factors = [jg.LayerJacobian(rng.standard_normal((B, widths[k + 1])), rng.standard_normal((widths[k], widths[k + 1])))
               for k in range(K)]
    sizes = []

    def record(a):
        sizes.append(a.size // B)  # every factor is per sample: each array holds the B samples'
        return a

    real_matmul, real_dense = bracket_evaluate.matmul, jg.LayerJacobian.dense
    monkeypatch.setattr(bracket_evaluate, "matmul", lambda a, b: record(real_matmul(a, b)))
    monkeypatch.setattr(jg.LayerJacobian, "dense", lambda J, *a, **k: record(real_dense(J, *a, **k)))
    for tree in all_bracketings(0, K - 1):
        sizes.clear()
        got = bracketing.evaluate(tree, factors, transposed=False)
        assert got.shape == (B, widths[-1], widths[0]) and sizes
        assert bracketing.peak_elements(tree, widths) == max(sizes), (tree, widths, sizes)
