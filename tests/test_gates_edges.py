"""jacgrad.elementwise.gates at the edges: fresh gradient memory, exact zeros (no 0·∞), Python numbers as 0-d
arrays, and non-numbers refused. The reference is PyTorch autograd, gate by gate."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jacgrad.elementwise import gates
from jacgrad import to_numpy

torch = pytest.importorskip("torch")

# (gate, params, torch's version) for the elementwise gates; torch's ops are the reference.
ELEMENTWISE = [
    ("add", {}, lambda x, y: x + y),
    ("mul", {}, lambda x, y: x * y),
    ("max", {}, torch.maximum),
    ("min", {}, torch.minimum),
    ("exp", {}, torch.exp),
    ("log", {}, torch.log),
    ("reciprocal", {}, torch.reciprocal),
    ("add_const", {"c": 2.5}, lambda x: 2.5 + x),
    ("scale", {"a": -1.5}, lambda x: -1.5 * x),
    ("pow", {"p": 0}, lambda x: x**0),
    ("pow", {"p": 1}, lambda x: x**1),
    ("pow", {"p": 2}, lambda x: x**2),
    ("pow", {"p": 3}, lambda x: x**3),
    ("pow", {"p": 0.5}, lambda x: x**0.5),
    ("pow", {"p": -1}, lambda x: x**-1),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("relu", {}, torch.relu),
]
IDS = [f"{n}-{p}" if p else n for n, p, _ in ELEMENTWISE]
SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -0.5, 1e-300, np.inf, -np.inf, np.nan])
# Where torch rounds differently and we keep the more accurate value, the grid point is left out:
# - reciprocal at 1e-300: torch forms -g·(out·out), whose out·out overflows (0·∞ = NaN for g = 0);
#   we form (-g·out)·out, which is finite and exact there (g/x² with g = 1e-300 is 1e300).
# - x^0.5 at -0.0 and -inf: NumPy's (C's) pow(-0, -0.5) = +inf, the one-sided slope of the
#   square root, and pow(-inf, -0.5) = 0; torch gives -inf and NaN.
TORCH_DIFFERS = {"reciprocal": [1e-300], "pow-{'p': 0.5}": [-0.0, -np.inf]}


def _torch_vjp(fn, g, *inputs):
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    out = fn(*ts)
    out.backward(torch.tensor(g, dtype=torch.float64))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("name,params,fn", ELEMENTWISE, ids=IDS)
def test_values_and_gradients_at_zero_inf_and_nan_match_torch(name, params, fn):
    # Every pairing of special inputs with every special g: NaN exactly where torch has NaN
    # (no 0·∞ of our own making), the same infinities, the same zeros.
    gate = gates.get(name)
    grid = np.meshgrid(*([SPECIAL] * gate.arity + [SPECIAL]), indexing="ij")
    *inputs, g = (a.ravel() for a in grid)
    key = f"{name}-{params}" if params else name
    if key in TORCH_DIFFERS:
        keep = ~np.any([(x == bad) & (np.signbit(x) == np.signbit(bad))
                        for x in inputs for bad in TORCH_DIFFERS[key]], axis=0)
        inputs, g = [x[keep] for x in inputs], g[keep]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        out = gate.forward(*inputs, **params)
        grads = gate.vjp(g, *inputs, **params)
    t_out, t_grads = _torch_vjp(fn, g, *inputs)
    np.testing.assert_allclose(out, t_out, rtol=1e-15, atol=0)  # sigmoid: torch's formula differs by an ulp
    for i, (d, t) in enumerate(zip(grads, t_grads)):
        np.testing.assert_allclose(d, t, rtol=1e-15, atol=0, err_msg=f"{name} gradient {i}")


def test_pow_with_p_zero_has_zero_gradient_at_zero():
    # x⁰ = 1 everywhere: the gradient is 0 at x = 0 as well (autograd and torch), not 0·0⁻¹ = NaN.
    (d,) = gates.get("pow").vjp(np.array([2.0, np.inf]), np.zeros(2), p=0)
    assert np.array_equal(d, [0.0, 0.0])
    assert float(gates.get("pow").vjp(1.0, 0.0, p=0)[0]) == 0.0


def _all_gate_calls(rng):
    """One call of every gate: (name, g, inputs, params)."""
    for name in gates.names():
        gate = gates.get(name)
        params = {"add_const": {"c": 1.0}, "scale": {"a": 2.0}, "pow": {"p": 2}}.get(name, {})
        if name == "matmul":
            inputs = (rng.standard_normal((3, 4)), rng.standard_normal((4, 2)))
        else:
            inputs = tuple(rng.uniform(0.5, 2.0, (3, 4)) for _ in range(gate.arity))
        g = rng.standard_normal(np.shape(gate.forward(*inputs, **params)))
        yield name, g, inputs, params


def test_no_gradient_is_the_callers_array_or_another_gradient(rng):
    for name, g, inputs, params in _all_gate_calls(rng):
        g_before = g.copy()
        inputs_before = [x.copy() for x in inputs]
        grads = gates.get(name).vjp(g, *inputs, **params)
        for i, d in enumerate(grads):
            others = [g, *inputs, *grads[:i], *grads[i + 1:]]
            assert not any(np.shares_memory(d, o) for o in others), f"{name}: gradient {i} aliases"
        for d in grads:
            d += 5.0  # the user's in-place edit changes nothing else
        assert np.array_equal(g, g_before), name
        assert all(np.array_equal(x, x0) for x, x0 in zip(inputs, inputs_before)), name
        assert not any(np.shares_memory(gates.get(name).forward(*inputs, **params), x) for x in inputs)


def test_add_hands_two_copies_of_g(rng):
    g, x, y = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4)
    gx, gy = gates.get("add").vjp(g, x, y)
    assert gx is not g and gy is not g and gx is not gy
    g0 = g.copy()
    gx += 5
    assert np.array_equal(gy, g0) and np.array_equal(g, g0)
    (gc,) = gates.get("add_const").vjp(g, x, c=3.0)
    gc *= 0
    assert np.array_equal(g, g0)


@pytest.mark.parametrize("name,params,fn", ELEMENTWISE, ids=IDS)
def test_python_numbers_behave_like_0d_arrays(name, params, fn):
    gate = gates.get(name)
    for x in SPECIAL:
        inputs = (float(x),) * gate.arity
        arrays = tuple(np.array(v) for v in inputs)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out, out_a = gate.forward(*inputs, **params), gate.forward(*arrays, **params)
            grads, grads_a = gate.vjp(1.0, *inputs, **params), gate.vjp(np.array(1.0), *arrays, **params)
        assert np.shape(out) == () and np.result_type(out) == np.float64
        np.testing.assert_array_equal(out, out_a)
        np.testing.assert_array_equal(np.array(grads, dtype=float), np.array(grads_a, dtype=float))


def test_python_numbers_follow_numpy_not_python_arithmetic():
    with pytest.warns(RuntimeWarning):
        assert gates.get("log").forward(0.0) == -np.inf
    with pytest.warns(RuntimeWarning):
        assert gates.get("log").vjp(1.0, 0.0) == (np.inf,)
    with pytest.warns(RuntimeWarning):
        assert gates.get("reciprocal").forward(0.0) == np.inf
    with pytest.warns(RuntimeWarning):
        assert gates.get("reciprocal").vjp(1.0, 0) == (-np.inf,)
    with pytest.warns(RuntimeWarning):
        r = gates.get("pow").forward(-1.0, p=0.5)
    assert not isinstance(r, complex) and np.isnan(r)
    x32 = np.float32(2.0)  # a NumPy scalar is strong, as in NumPy
    assert gates.get("mul").forward(x32, 3.0).dtype == np.float32
    (d,) = gates.get("exp").vjp(np.float32(1.0), 0.0)  # only g is typed: it sets the width
    assert d.dtype == np.float32


@pytest.mark.parametrize("bad", [None, "1.0", 1j, [None, 1.0], object()])
def test_non_numbers_are_refused_by_name(bad):
    with pytest.raises(TypeError, match="input 0 of gate 'exp' is"):
        gates.get("exp").forward(bad)
    with pytest.raises(TypeError, match="input 1 of gate 'add' is"):
        gates.get("add").vjp(1.0, 1.0, bad)
    with pytest.raises(TypeError, match="g of gate 'exp'"):
        gates.get("exp").vjp(bad, 1.0)


def test_fresh_gradients_and_exact_zeros_on_every_backend(xp):
    g, x, y = xp.ones(3), xp.asarray([0.0, 1.0, 2.0]), xp.asarray([1.0, 1.0, 1.0])
    gx, gy = gates.get("add").vjp(g, x, y)
    gx += 5
    assert bool((gy == 1).all()) and bool((g == 1).all())
    (d,) = gates.get("pow").vjp(g, x, p=0)
    assert type(d) is type(x) and not bool(d.any())
    inf = xp.full(3, float("inf"))
    dx, dy = gates.get("max").vjp(inf, x, y)  # x loses at 0, ties at 1, wins at 2
    assert to_numpy(dx).tolist() == [0.0, np.inf, np.inf] and to_numpy(dy).tolist() == [np.inf, np.inf, 0.0]
