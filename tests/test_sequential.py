"""Sequential's contract: a stack of Dense layers IS an MLP (same passes, bitwise), caches belong
to their network, check_finite names the layer, input_grad=False skips ∂L/∂x, results never
alias the caller's arrays."""

import numpy as np
import pytest

import jacgrad as jg

L = jg.layers


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_dense_stack_is_bitwise_the_mlp(act):
    mlp = jg.MLP.init([4, 7, 5, 3], activation=act, bias_std=0.1, seed=0)
    seq = jg.Sequential([L.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    lm, gm = mlp.loss_and_grads(x, t)
    ls, gs = seq.loss_and_grads(x, t)
    assert float(lm) == float(ls)
    np.testing.assert_array_equal(gs.flat, gm.flat)
    np.testing.assert_array_equal(gs.input, gm.input)
    for a, b in zip(gs.deltas, gm.deltas):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(seq.jacobian_chain(seq.forward(x)[1]).jacobian(),
                                  mlp.jacobian_chain(mlp.forward(x)[1]).jacobian())
    np.testing.assert_array_equal(seq.per_sample_grad_norms(x, t), mlp.per_sample_grad_norms(x, t))


def _net():
    rng = np.random.default_rng(1)
    return jg.Sequential([L.Dense(rng.standard_normal((3, 4)), None, "tanh"),
                          L.Residual([L.LayerNorm(np.ones(4)), L.Dense(rng.standard_normal((4, 4)))], 0.5),
                          L.Dense(rng.standard_normal((4, 2)))])


def test_caches_belong_to_their_network():
    a, b = _net(), _net()
    _, cache = a.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="another network's forward"):
        b.backward(cache, np.ones((2, 2)))
    with pytest.raises(TypeError, match="expected the cache"):
        a.jacobian_chain("cache")
    with pytest.raises(ValueError, match=r"grad_y has shape \(2, 3\).*needs \(2, 2\)"):
        a.backward(cache, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"layer 0 expects 3 features"):
        a.forward(np.ones((2, 4)))


def test_check_finite_names_the_layer():
    net = _net()
    x = np.ones((2, 3))
    x[1, 0] = np.nan
    with pytest.raises(FloatingPointError, match="the input x"):
        net.forward(x, check_finite=True)
    _, cache = net.forward(np.ones((2, 3)))
    gy = np.ones((2, 2))
    gy[0, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"layer 2: gradient"):
        net.backward(cache, gy, check_finite=True)


def test_input_grad_false_and_no_aliasing():
    net = _net()
    x = np.random.default_rng(2).standard_normal((3, 3))
    y, cache = net.forward(x)
    gy = np.ones((3, 2))
    g = net.backward(cache, gy, input_grad=False)
    assert g.input is None
    y += 1.0  # the caller's y: changing it changes nothing the cache reads
    gy[:] = 5.0
    np.testing.assert_array_equal(net.backward(cache, np.ones((3, 2)), input_grad=False).flat, g.flat)
    assert not any(np.shares_memory(d, gy) for d in g.deltas)
