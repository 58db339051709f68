"""The softmax gate's VJP keeps its relative accuracy where the softmax saturates (one output
rounds to 1): checked component by component against a 60-digit mpmath reference."""

import numpy as np
import pytest

import jacgrad as jg

mpmath = pytest.importorskip("mpmath")


def _reference(x, g):
    """``∂/∂x <g, softmax(x)>`` per row, in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    out = np.empty(x.shape)
    for i, (row, gr) in enumerate(zip(x, g)):
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in row]
        s = mpmath.fsum(e)
        y = [v / s for v in e]
        gy = mpmath.fsum(mpmath.mpf(float(a)) * b for a, b in zip(gr, y))
        out[i] = [float(b * (mpmath.mpf(float(a)) - gy)) for a, b in zip(gr, y)]
    return out


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
def test_softmax_vjp_is_accurate_at_every_scale(scale):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5)) * scale
    g = rng.standard_normal((6, 5))
    gate = jg.gates.get("softmax")
    (got,) = gate.vjp(g, x)
    want = _reference(x, g)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)


def test_softmax_vjp_of_a_constant_cotangent_is_zero():
    x = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 40.0]])
    (got,) = jg.gates.get("softmax").vjp(np.full((2, 3), 0.3), x)
    np.testing.assert_allclose(got, 0.0, atol=1e-15)  # Σ softmax = 1: a constant cotangent has no gradient
