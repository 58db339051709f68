"""Chains mixing diag(d)·Wᵀ factors with structured ones (I + s·J_inner, normalisations): "auto"
is the cheapest of all bracketings under the row-action cost model, and every bracketing
evaluates to the product of the factors' dense forms."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra import bracketing
from jacgrad.algebra.factors import NormFactor
from jacgrad.algebra.residual_factor import ResidualFactor


def _all_trees(i, j) -> list:
    """Every bracketing of the factors i..j (a leaf, or (output side, input side))."""
    return [i] if i == j else [(o, n) for m in range(i, j) for o in _all_trees(m + 1, j) for n in _all_trees(i, m)]


def _chain(rng, K, B):
    """K factors, about half structured, widths random where a dense factor allows."""
    factors, n = [], int(rng.integers(2, 9))
    first = n
    for _ in range(K):
        kind = rng.integers(0, 3)
        if kind == 0:
            m = int(rng.integers(1, 9))
            factors.append(jg.LayerJacobian(rng.random((B, m)), rng.standard_normal((n, m))))
            n = m
        elif kind == 1:
            x = rng.standard_normal((B, n))
            xc = x - x.mean(1, keepdims=True)
            inv = 1 / np.sqrt((xc ** 2).mean(1) + 0.1)
            factors.append(NormFactor(rng.random(n) + 0.5, inv, xc * inv[:, None], centered=bool(rng.integers(0, 2))))
        else:
            inner = jg.Chain([jg.LayerJacobian(rng.random((B, n)), rng.standard_normal((n, n)) / np.sqrt(n))])
            factors.append(ResidualFactor(inner, float(rng.uniform(0.1, 1.0))))
    return jg.Chain(factors), first


@pytest.mark.parametrize("seed", range(8))
def test_auto_is_the_cheapest_bracketing_and_every_bracketing_is_the_product(seed):
    rng = np.random.default_rng(seed)
    K, B = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    C, _ = _chain(rng, K, B)
    if not C.structured:
        C = jg.Chain(C.factors + [NormFactor(np.ones(C.n_out), np.ones(B), rng.standard_normal((B, C.n_out)))])
        K += 1
    per_sample = [J.per_sample for J in C.factors]
    c = [bracketing.row_cost(J) for J in C.factors]
    d = [0 if isinstance(J, jg.LayerJacobian) else J.dense_cost for J in C.factors]
    trees = _all_trees(0, K - 1)
    costs = [bracketing._cost(t, C.widths, per_sample, B, c, d)[2] for t in trees]
    assert C.jacobian_cost("auto") == min(costs)
    assert C.jacobian_cost("auto") <= min(C.jacobian_cost("forward"), C.jacobian_cost("reverse"))
    want = C.factors[0].dense()
    for J in C.factors[1:]:
        want = J.dense() @ want
    for t in trees:
        np.testing.assert_allclose(bracketing.evaluate(t, C.factors, False), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bracketing.evaluate(t, C.factors, True), want.swapaxes(-1, -2), rtol=1e-12,
                                   atol=1e-12)
    np.testing.assert_allclose(C.jacobian("auto"), want, rtol=1e-12, atol=1e-12)


def test_dense_chains_plan_as_before():
    rng = np.random.default_rng(0)
    C = jg.Chain([jg.LayerJacobian(rng.random((2, 3)), rng.standard_normal((5, 3))),
                  jg.LayerJacobian(rng.random((2, 4)), rng.standard_normal((3, 4)))])
    assert not C.structured
    assert C.jacobian_cost("auto") == bracketing.plan("auto", C.widths, [True, True], 2).cost


def test_a_narrow_head_never_forms_a_residual_block_densely(monkeypatch):
    """Forming I + s·J_inner costs J_inner's whole Jacobian: with a 2-wide head, reverse and auto
    form the head and pull its rows back through the blocks."""
    rng = np.random.default_rng(3)
    B, n = 3, 40
    inner = jg.Chain([jg.LayerJacobian(rng.random((B, n)), rng.standard_normal((n, n))) for _ in range(2)])
    head = jg.LayerJacobian(rng.random((B, 2)), rng.standard_normal((n, 2)))
    C = jg.Chain([ResidualFactor(inner, 0.5), ResidualFactor(inner, 0.2), head])
    want = head.dense() @ C.factors[1].dense() @ C.factors[0].dense()

    def refuse(self, transposed=False):
        raise AssertionError("a residual block was formed densely")

    monkeypatch.setattr(ResidualFactor, "dense", refuse)
    for order in ("reverse", "auto"):
        np.testing.assert_allclose(C.jacobian(order), want, rtol=1e-12, atol=1e-12)
