"""A network works out its passes' plan (buffer layouts, each layer's passes) once per input lead
(``nn.stack.Plans``): results must not depend on what was worked out before — a changed
activation, another batch size, a token batch, shared layers, pickling. Checked against torch
autograd (float64) and against a network built afresh."""

import pickle

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")


def _torch_grads(net, x, t):
    """``(loss, [∂W, ∂b per layer])`` of mse through torch autograd, from ``net``'s arrays."""
    z = torch.tensor(x, requires_grad=False)
    params = []
    for L in net.layers:
        W, b = torch.tensor(L.W, requires_grad=True), torch.tensor(L.b, requires_grad=True)
        params += [W, b]
        h = z @ W + b
        z = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "identity": lambda a: a,
             "relu": torch.relu}[L.activation](h)
    loss = 0.5 * ((z - torch.tensor(t)) ** 2).sum() / x.shape[0]
    loss.backward()
    return float(loss.detach()), [p.grad.numpy() for p in params]


def _mse_scale_ok(net, x, t):
    """jacgrad's mse against torch's, up to its normalisation (read off once, then every gradient)."""
    value, g = net.loss_and_grads(x, t)
    ref_value, ref = _torch_grads(net, x, t)
    c = value / ref_value
    mine = [a for e in g.layers for a in (e["W"], e["b"])]
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, c * b, rtol=1e-10, atol=1e-12)


def test_a_changed_activation_changes_the_plan():
    rng = np.random.default_rng(0)
    net = jg.MLP.init([5, 7, 6, 3], activation="tanh", seed=1)
    x, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    _mse_scale_ok(net, x, t)  # a tanh net's plan: y kept, one buffer per layer
    net.activations[1] = "gelu"  # φ' needs h: two forward buffers, its output recomputed by backward
    _mse_scale_ok(net, x, t)
    fresh = jg.MLP(list(net.weights), list(net.biases), list(net.activations))
    a, b = net.loss_and_grads(x, t)[1], fresh.loss_and_grads(x, t)[1]
    assert np.array_equal(a.flat, b.flat) and np.array_equal(a.input, b.input)


def test_a_network_sharing_the_layers_sees_the_change():
    rng = np.random.default_rng(1)
    mlp = jg.MLP.init([4, 6, 2], activation="tanh", seed=2)
    seq = jg.Sequential(mlp.layers)  # the very Dense layers
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 2))
    seq.loss_and_grads(x, t)
    mlp.activations[0] = "gelu"
    _mse_scale_ok(seq, x, t)
    y, _ = seq.forward(x)
    np.testing.assert_array_equal(y, mlp.forward(x)[0])


@pytest.mark.parametrize("batches", [[4, 9, 4, 1, 9], list(range(1, 12)) + [3]])
def test_batch_sizes_in_any_order(batches):
    net = jg.MLP.init([3, 8, 8, 2], activation="relu", seed=3)
    fresh_of = lambda: jg.MLP(list(net.weights), list(net.biases), list(net.activations))  # noqa: E731
    rng = np.random.default_rng(2)
    for B in batches:  # more leads than a network keeps plans for, and some again
        x, t = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
        a, b = net.loss_and_grads(x, t)[1], fresh_of().loss_and_grads(x, t)[1]
        assert np.array_equal(a.flat, b.flat) and all(np.array_equal(p, q) for p, q in zip(a.deltas, b.deltas))
    _mse_scale_ok(net, x, t)


def test_token_and_row_batches_of_one_network():
    rng = np.random.default_rng(3)
    net = jg.Sequential([jg.layers.Dense(rng.standard_normal((3, 5)), activation="gelu"),
                         jg.layers.LayerNorm(np.ones(5), np.zeros(5)), jg.layers.Dense(rng.standard_normal((5, 2)))])
    xt, tt = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 2))
    g_tok = net.loss_and_grads(xt, tt)[1]
    g_rows = net.loss_and_grads(xt.reshape(8, 3), tt.reshape(8, 2))[1]  # mse: a sum over rows either way
    np.testing.assert_allclose(g_tok.flat, g_rows.flat, rtol=1e-12, atol=1e-14)
    g_tok2 = net.loss_and_grads(xt, tt)[1]
    assert np.array_equal(g_tok.flat, g_tok2.flat)


def test_pickling_drops_the_plans():
    rng = np.random.default_rng(4)
    net = jg.MLP.init([3, 4, 2], activation="tanh", seed=4)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    g = net.loss_and_grads(x, t)[1]
    assert "_plans" not in net.__getstate__()
    back = pickle.loads(pickle.dumps(net))
    assert np.array_equal(back.loss_and_grads(x, t)[1].flat, g.flat)
