"""jacgrad.elementwise.gates: one spec per gate, one checker; the worked circuits of the cs231n notes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jacgrad.elementwise import gates
from jacgrad.algebra.check import check_vjp, numerical_jacobian, relative_error


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def positive(*shape):
    return lambda rng: rng.uniform(0.5, 3.0, shape)


def away_from_zero(*shape):
    return lambda rng: rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)


def apart(*shape):
    """Two inputs at least 0.2 apart, so max/min are differentiable where they are sampled."""
    def make(rng):
        x = rng.standard_normal(shape)
        return x, x + away_from_zero(*shape)(rng)
    return make


@dataclass
class Spec:
    id: str
    gate: str
    inputs: Callable  # rng -> one input per generator, or a tuple from one generator (apart)
    params: dict = field(default_factory=dict)
    torch: Callable | None = None  # torch's version of the gate, for the independent check


def _inputs(spec: Spec, rng) -> tuple:
    made = spec.inputs(rng) if callable(spec.inputs) else tuple(make(rng) for make in spec.inputs)
    return made if isinstance(made, tuple) else (made,)


SPECS = [
    Spec("add", "add", (normal(3, 4), normal(4)), torch=lambda t, x, y: x + y),
    Spec("add-floats", "add", (lambda rng: -2.0, lambda rng: 5.0), torch=lambda t, x, y: x + y),
    Spec("mul", "mul", (normal(3, 4), normal(3, 1)), torch=lambda t, x, y: x * y),
    Spec("mul-by-float", "mul", (normal(3, 4), lambda rng: 1.5), torch=lambda t, x, y: x * y),
    Spec("max", "max", apart(2, 5), torch=lambda t, x, y: t.maximum(x, y)),
    Spec("min", "min", apart(2, 5), torch=lambda t, x, y: t.minimum(x, y)),
    Spec("exp", "exp", (normal(3, 4),), torch=lambda t, x: t.exp(x)),
    Spec("log", "log", (positive(3, 4),), torch=lambda t, x: t.log(x)),
    Spec("reciprocal", "reciprocal", (away_from_zero(3, 4),), torch=lambda t, x: t.reciprocal(x)),
    Spec("add_const", "add_const", (normal(3, 4),), {"c": 2.5}, torch=lambda t, x, c: c + x),
    Spec("scale", "scale", (normal(3, 4),), {"a": -1.5}, torch=lambda t, x, a: a * x),
    Spec("pow-3", "pow", (normal(3, 4),), {"p": 3}, torch=lambda t, x, p: x**p),
    Spec("pow-sqrt", "pow", (positive(3, 4),), {"p": -0.5}, torch=lambda t, x, p: x**p),
    Spec("sigmoid", "sigmoid", (lambda rng: 3 * rng.standard_normal((3, 4)),), torch=lambda t, x: t.sigmoid(x)),
    Spec("tanh", "tanh", (normal(3, 4),), torch=lambda t, x: t.tanh(x)),
    Spec("relu", "relu", (away_from_zero(3, 4),), torch=lambda t, x: t.relu(x)),
    Spec("matmul", "matmul", (normal(5, 10), normal(10, 3)), torch=lambda t, W, X: W @ X),
    Spec("sum", "sum", (normal(2, 3, 4),), torch=lambda t, x: x.sum()),
    Spec("sum-axis-0", "sum", (normal(2, 3, 4),), {"axis": 0}, torch=lambda t, x, axis: x.sum(dim=axis)),
    Spec("sum-axes", "sum", (normal(2, 3, 4),), {"axis": (0, -1)}, torch=lambda t, x, axis: x.sum(dim=axis)),
    Spec("mean", "mean", (normal(2, 3, 4),), torch=lambda t, x: x.mean()),
    Spec("mean-axis-1", "mean", (normal(2, 3, 4),), {"axis": 1}, torch=lambda t, x, axis: x.mean(dim=axis)),
    Spec("softmax", "softmax", (normal(3, 5),), torch=lambda t, x: t.softmax(x, dim=-1)),
    Spec("softmax-1d", "softmax", (normal(4),), torch=lambda t, x: t.softmax(x, dim=-1)),
]


@pytest.fixture(params=SPECS, ids=[s.id for s in SPECS])
def spec(request):
    return request.param


def _replace(inputs, i, x):
    return inputs[:i] + (x,) + inputs[i + 1:]


def test_the_table_has_the_gates_of_the_notes():
    assert gates.names() == ["add", "mul", "max", "min", "exp", "log", "reciprocal", "add_const", "scale",
                             "pow", "sigmoid", "tanh", "relu", "matmul", "sum", "mean", "softmax"]
    assert {s.gate for s in SPECS} == set(gates.names())
    assert all(gates.get(n).formula for n in gates.names())


def test_vjp_matches_finite_differences_and_passes_the_adjoint_test(spec, rng):
    gate, inputs = gates.get(spec.gate), _inputs(spec, rng)
    out = gate.forward(*inputs, **spec.params)
    g = rng.standard_normal(np.shape(out))
    grads = gate.vjp(g, *inputs, **spec.params)
    assert len(grads) == gate.arity
    for i, x in enumerate(inputs):
        assert np.shape(grads[i]) == np.shape(x)

        def f(xi, i=i):
            return gate.forward(*_replace(inputs, i, xi), **spec.params)

        J = numerical_jacobian(f, x)
        assert relative_error(grads[i], np.tensordot(g, J, axes=np.ndim(g))) < 1e-7
        assert check_vjp(f, lambda v, i=i: gate.vjp(v, *inputs, **spec.params)[i], x) < 1e-8


def test_float32_in_float32_out_close_to_float64(spec, rng):
    gate, inputs = gates.get(spec.gate), _inputs(spec, rng)
    inputs32 = tuple(x.astype(np.float32) if isinstance(x, np.ndarray) else x for x in inputs)
    out64, out32 = gate.forward(*inputs, **spec.params), gate.forward(*inputs32, **spec.params)
    g = rng.standard_normal(np.shape(out64))
    g32 = g.astype(np.float32) if np.ndim(g) else float(g)
    grads64, grads32 = gate.vjp(g, *inputs, **spec.params), gate.vjp(g32, *inputs32, **spec.params)
    if any(isinstance(x, np.ndarray) for x in inputs):
        assert np.result_type(out32) == np.float32
    assert relative_error(out32, out64) < 1e-5
    for x, d32, d64 in zip(inputs32, grads32, grads64):
        if isinstance(x, np.ndarray):
            assert np.result_type(d32) == np.float32
        assert relative_error(d32, d64) < 1e-5


def test_values_and_gradients_match_torch(spec, rng):
    torch = pytest.importorskip("torch")
    gate, inputs = gates.get(spec.gate), _inputs(spec, rng)
    out = gate.forward(*inputs, **spec.params)
    g = rng.standard_normal(np.shape(out))
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    t_out = spec.torch(torch, *ts, **spec.params)
    t_out.backward(torch.tensor(g))
    assert relative_error(out, t_out.detach().numpy()) < 1e-12
    for d, t in zip(gate.vjp(g, *inputs, **spec.params), ts):
        assert relative_error(d, t.grad.numpy()) < 1e-12


# The worked examples of cs231n-backpropagation.txt, with the numbers of the notes.

def test_circuit_x_plus_y_times_z():
    # f(x, y, z) = (x + y) z at x = -2, y = 5, z = -4: q = 3, f = -12; df/dz = q = 3,
    # df/dq = z = -4, which the add gate hands to x and y unchanged.
    add, mul = gates.get("add"), gates.get("mul")
    x, y, z = -2.0, 5.0, -4.0
    q = add.forward(x, y)
    assert (q, mul.forward(q, z)) == (3.0, -12.0)
    dq, dz = mul.vjp(1.0, q, z)
    dx, dy = add.vjp(dq, x, y)
    assert (dx, dy, dz) == (-4.0, -4.0, 3.0)


def test_sigmoid_neuron_of_the_notes():
    # w = [2, -3, -3], x = [-1, -2]: dot = w0 x0 + w1 x1 + w2 = 1, f = σ(1) = 0.73,
    # ddot = (1 - f) f, dx = [w0, w1]·ddot, dw = [x0, x1, 1.0]·ddot (the notes' code).
    add, mul, sigmoid = gates.get("add"), gates.get("mul"), gates.get("sigmoid")
    w0, w1, w2 = 2.0, -3.0, -3.0
    x0, x1 = -1.0, -2.0
    a, b = mul.forward(w0, x0), mul.forward(w1, x1)
    s = add.forward(a, b)
    dot = add.forward(s, w2)
    f = sigmoid.forward(dot)
    assert dot == 1.0 and round(float(f), 2) == 0.73
    (ddot,) = sigmoid.vjp(1.0, dot)
    assert round(float(ddot), 1) == 0.2  # "(1 - 0.73) * 0.73 ~= 0.2"
    ds, dw2 = add.vjp(ddot, s, w2)
    da, db = add.vjp(ds, a, b)
    dw0, dx0 = mul.vjp(da, w0, x0)
    dw1, dx1 = mul.vjp(db, w1, x1)
    assert np.round([dx0, dx1], 3).tolist() == [0.393, -0.59]
    assert np.round([dw0, dw1, dw2], 3).tolist() == [-0.197, -0.393, 0.197]
    assert np.allclose([dx0, dx1, dw0, dw1, dw2], np.array([w0, w1, x0, x1, 1.0]) * ddot, rtol=1e-15)


def test_sigmoid_as_one_gate_equals_its_circuit_of_small_gates(rng):
    # σ(x) = 1 / (1 + exp(-x)): the notes' chain of scale(-1), exp, add_const(1), reciprocal.
    x, g = rng.standard_normal(6), rng.standard_normal(6)
    chain = [("scale", {"a": -1.0}), ("exp", {}), ("add_const", {"c": 1.0}), ("reciprocal", {})]
    values = [x]
    for name, params in chain:
        values.append(gates.get(name).forward(values[-1], **params))
    grad = g
    for (name, params), value in zip(reversed(chain), reversed(values[:-1])):
        (grad,) = gates.get(name).vjp(grad, value, **params)
    sigmoid = gates.get("sigmoid")
    assert relative_error(values[-1], sigmoid.forward(x)) < 1e-15
    assert relative_error(grad, sigmoid.vjp(g, x)[0]) < 1e-14


def test_add_distributes_max_routes_mul_swaps():
    # "Patterns in backward flow": f = 2·(x·y + max(z, w)). The text: the + gate routes 2.00 to
    # both inputs, max routes 2.00 to z (larger than w) and 0 to w, and the gradient on x is
    # -8.00 = -4.00 × 2.00. The inputs x = 3, y = -4, z = 2, w = -1 are the figure's.
    x, y, z, w = 3.0, -4.0, 2.0, -1.0
    mul, mx, add, scale = (gates.get(n) for n in ("mul", "max", "add", "scale"))
    p, m = mul.forward(x, y), mx.forward(z, w)
    s = add.forward(p, m)
    assert (p, m, s, scale.forward(s, a=2.0)) == (-12.0, 2.0, -10.0, -20.0)
    (ds,) = scale.vjp(1.0, s, a=2.0)
    dp, dm = add.vjp(ds, p, m)
    dz, dw = mx.vjp(dm, z, w)
    dx, dy = mul.vjp(dp, x, y)
    assert (ds, dp, dm) == (2.0, 2.0, 2.0)
    assert (dz, dw) == (2.0, 0.0)
    assert (dx, dy) == (-8.0, 6.0)


def test_matmul_follows_the_notes_dW_is_dD_Xt_and_dX_is_Wt_dD(rng):
    W, X = rng.standard_normal((5, 10)), rng.standard_normal((10, 3))
    dD = rng.standard_normal((5, 3))
    matmul = gates.get("matmul")
    assert np.array_equal(matmul.forward(W, X), W.dot(X))
    dW, dX = matmul.vjp(dD, W, X)
    assert np.array_equal(dW, dD.dot(X.T)) and np.array_equal(dX, W.T.dot(dD))


def test_ties_and_kinks_follow_torch():
    torch = pytest.importorskip("torch")
    x, y = np.array([1.0, 2.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, 0.0])
    g = np.array([1.0, 2.0, 3.0, 4.0])
    for name, fn in (("max", torch.maximum), ("min", torch.minimum)):
        tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
        fn(tx, ty).backward(torch.tensor(g))
        dx, dy = gates.get(name).vjp(g, x, y)
        assert np.array_equal(dx, tx.grad.numpy()) and np.array_equal(dy, ty.grad.numpy())
    assert gates.get("max").vjp(1.0, 1.0, 1.0) == (0.5, 0.5)
    h = np.array([-1.0, 0.0, 1.0])
    th = torch.tensor(h, requires_grad=True)
    torch.relu(th).sum().backward()
    assert np.array_equal(gates.get("relu").vjp(np.ones(3), h)[0], th.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_softmax_and_tanh_are_finite_at_huge_inputs(dtype):
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=dtype)
    s = gates.get("sigmoid")
    assert s.forward(x)[0] == 0 and s.forward(x)[-1] == 1 and s.forward(x)[2] == 0.5
    for name in ("sigmoid", "softmax", "tanh"):
        out, (dx,) = gates.get(name).forward(x), gates.get(name).vjp(np.ones_like(x), x)
        assert np.isfinite(out).all() and np.isfinite(dx).all() and dx.dtype == dtype
    assert np.array_equal(gates.get("softmax").forward(x), np.eye(5, dtype=dtype)[4])


def test_gates_keep_the_backend_of_their_inputs(xp):
    x = xp.asarray([[0.5, -1.0], [2.0, 0.25]])
    for name in ("mul", "max", "matmul"):
        out = gates.get(name).forward(x, x)
        assert type(out) is type(x)
        assert all(type(d) is type(x) for d in gates.get(name).vjp(out, x, x))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_broadcast_inputs_get_gradients_summed_back_to_their_shape(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="shape"))
    # the second input drops leading axes and sets some of the rest to 1
    keep = data.draw(st.integers(0, len(shape)), label="kept axes")
    small = tuple(n if data.draw(st.booleans()) else 1 for n in shape[len(shape) - keep:])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x, y = rng.standard_normal(shape), rng.standard_normal(small)
    g = rng.standard_normal(shape)
    for name in ("add", "mul", "max"):
        gate = gates.get(name)
        dx, dy = gate.vjp(g, x, y)
        assert dx.shape == shape and np.shape(dy) == small
        J = numerical_jacobian(lambda y: gate.forward(x, y), y)
        if name != "max" or np.abs(x - y).min() > 1e-4:  # finite differences need no tie nearby
            assert relative_error(dy, np.tensordot(g, J, axes=len(shape))) < 1e-7


def test_errors_name_what_is_wrong():
    with pytest.raises(KeyError, match="unknown gate 'sqrt'; valid names: add, mul, max"):
        gates.get("sqrt")
    with pytest.raises(TypeError, match="gate 'mul' takes 2 input"):
        gates.get("mul").forward(1.0)
    with pytest.raises(TypeError, match=r"gate 'pow': missing keyword parameter\(s\) p; its keyword parameters are: p"):
        gates.get("pow").forward(2.0)
    with pytest.raises(TypeError, match=r"gate 'sum': unknown keyword parameter\(s\) dim; its keyword parameters are: axis"):
        gates.get("sum").forward(np.ones(2), dim=0)
    with pytest.raises(TypeError, match="gate 'scale': a must be a real number"):
        gates.get("scale").forward(2.0, a=np.ones(2))
    with pytest.raises(TypeError, match="input 1 of gate 'add' has dtype int64"):
        gates.get("add").forward(np.ones(2), np.arange(2))
    with pytest.raises(TypeError, match="input 0 of gate 'exp' has dtype bool"):
        gates.get("exp").forward(np.array([True]))
    with pytest.raises(ValueError, match=r"gate 'exp': g has shape \(3,\) but the output has shape \(2,\)"):
        gates.get("exp").vjp(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match=r"D = W·X with W \(M, K\) and X \(K, N\); got W \(5, 10\) and X \(9, 3\)"):
        gates.get("matmul").forward(np.ones((5, 10)), np.ones((9, 3)))
    with pytest.raises(ValueError, match="softmax.*at least 1-D"):
        gates.get("softmax").forward(1.0)


def test_python_numbers_stay_weak_so_float32_stays_float32():
    x = np.ones(3, dtype=np.float32)
    assert gates.get("mul").forward(x, 2.0).dtype == np.float32
    dx, dy = gates.get("mul").vjp(np.ones(3, dtype=np.float32), x, 2.0)
    assert dx.dtype == np.float32 and np.result_type(dy) == np.float32 and np.shape(dy) == ()
    assert math.isclose(float(dy), 3.0)
