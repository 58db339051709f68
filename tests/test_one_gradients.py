"""One gradient type for every network (issue 19 item 3): ``Gradients`` carries ``flat``,
``layers[j]`` by name, and ``weights``/``biases``/``deltas`` for nets of Dense layers, whether an
``MLP`` or a ``Sequential`` made it; ``BlockGradients`` is the same type under its old name."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.nn.stack import BlockGradients
from jacgrad.protocol.passes import Gradients


def _dense_net(rng):
    Ws = [rng.standard_normal((3, 4)), rng.standard_normal((4, 2))]
    bs = [rng.standard_normal(4), rng.standard_normal(2)]
    return Ws, bs


def _torch_grads(Ws, bs, x, t):
    torch = pytest.importorskip("torch")
    Wt = [torch.tensor(W, requires_grad=True) for W in Ws]
    bt = [torch.tensor(b, requires_grad=True) for b in bs]
    z = torch.tanh(torch.tensor(x) @ Wt[0] + bt[0])
    y = z @ Wt[1] + bt[1]
    ((y - torch.tensor(t)) ** 2).sum(1).mean().mul(0.5).backward()
    return [W.grad.numpy() for W in Wt], [b.grad.numpy() for b in bt]


def test_block_gradients_is_gradients():
    assert BlockGradients is Gradients
    assert jg.sequential.BlockGradients is Gradients


@pytest.mark.parametrize("kind", ["mlp", "sequential"])
def test_dense_views_from_either_network(kind):
    rng = np.random.default_rng(0)
    Ws, bs = _dense_net(rng)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    if kind == "mlp":
        net = jg.MLP(Ws, bs, ["tanh", "identity"])
    else:
        net = jg.Sequential([jg.layers.Dense(Ws[0], bs[0], "tanh"), jg.layers.Dense(Ws[1], bs[1])])
    _, g = net.loss_and_grads(x, t, loss="mse")
    assert type(g) is Gradients
    # the loss is mean_i ½‖y_i − t_i‖²: check it is, against torch, if the 0.5 convention differs
    tW, tb = _torch_grads(Ws, bs, x, t)
    scale = np.vdot(g.weights[0], tW[0]) / np.vdot(tW[0], tW[0])
    for j in range(2):
        np.testing.assert_allclose(g.weights[j], scale * tW[j], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.biases[j], scale * tb[j], rtol=1e-10, atol=1e-12)
        assert g.layers[j]["W"] is g.weights[j] or np.shares_memory(g.layers[j]["W"], g.flat)
        np.testing.assert_array_equal(g.layers[j]["W"], g.weights[j])
        np.testing.assert_array_equal(g.layers[j]["b"], g.biases[j])
        assert np.shares_memory(g.weights[j], g.flat) and np.shares_memory(g.biases[j], g.flat)
    assert [d.shape for d in g.deltas] == [(5, 4), (5, 2)]


def test_weights_refused_for_a_net_with_other_layers():
    rng = np.random.default_rng(1)
    net = jg.Sequential([jg.layers.Dense(rng.standard_normal((3, 4)), None, "tanh"),
                         jg.layers.LayerNorm(np.ones(4), np.zeros(4))])
    _, g = net.loss_and_grads(rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), loss="mse")
    assert sorted(g.layers[1]) == ["beta", "gamma"]
    with pytest.raises(AttributeError, match=r"layer 1 has \['beta', 'gamma'\].*layers\[1\]"):
        g.weights


def test_one_view_or_the_other():
    with pytest.raises(TypeError, match="weights and biases .* or layers"):
        Gradients([np.zeros((2, 2))], [np.zeros(2)], layers=[{}])
    with pytest.raises(TypeError, match="weights and biases .* or layers"):
        Gradients()


def test_mlp_layers_follow_its_lists_and_a_refused_entry_changes_nothing():
    """The products read an MLP through its Dense layers (one implementation with Sequential's):
    a replaced weight, bias or activation is what they read next; a refused one changes nothing."""
    rng = np.random.default_rng(2)
    net = jg.MLP.init([3, 4, 2], seed=0, bias_std=0.1)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    W, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    net.weights[0], net.biases[0], net.activations[0] = W, b, "relu"
    fresh = jg.MLP([W, net.weights[1]], [b, net.biases[1]], ["relu", "identity"])
    assert net.layers[0].W is W and net.layers[0].b is b and net.layers[0].activation == "relu"
    np.testing.assert_array_equal(net.per_sample_grads(x, t).flat, fresh.per_sample_grads(x, t).flat)
    np.testing.assert_array_equal(net.ggn_diagonal(x).flat, fresh.ggn_diagonal(x).flat)
    with pytest.raises(ValueError, match=r"layer 1"):
        net.weights[1] = np.ones((4, 3))
    with pytest.raises(KeyError, match=r"layer 1"):
        net.activations[1] = "nope"
    assert net.layers[1].W is net.weights[1] and net.layers[1].activation == "identity"
