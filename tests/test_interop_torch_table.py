"""One activation table between torch modules and jacgrad rows, read by MLP.from_torch,
MLP.to_torch and Sequential.from_torch alike (they used to keep three tables by hand, and the
blocks reader refused every non-default parameter)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import jacgrad as jg  # noqa: E402
from jacgrad import activations  # noqa: E402
from jacgrad.interop.torch import activation_module, activation_name  # noqa: E402
from jacgrad.interop.torch_blocks import Residual  # noqa: E402

PARAMETERISED = [nn.LeakyReLU(0.2), nn.ELU(0.7), nn.Softplus(beta=2.0, threshold=10.0), nn.Hardtanh(-2.0, 3.0),
                 nn.ReLU6(), nn.GELU(approximate="tanh"), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.ReLU()]


@pytest.mark.parametrize("family", [n for n in activations.names() if n != "identity"])
def test_every_activation_row_has_a_torch_module_and_reads_back(family):
    name = activations.get(family).name
    module = activation_module(nn, name)
    assert activation_name(nn, module) == name
    h = torch.linspace(-4, 4, 101, dtype=torch.float64)
    np.testing.assert_allclose(activations.get(name).f(h.numpy()), module(h).numpy(), rtol=1e-14, atol=1e-15)


def test_subclasses_and_foreign_modules_are_not_activations():
    class MyTanh(nn.Tanh):
        pass

    assert activation_name(nn, MyTanh()) is None
    assert activation_name(nn, nn.Linear(2, 2)) is None
    assert activation_module(nn, "identity") is None


@pytest.mark.parametrize("act", PARAMETERISED, ids=lambda m: repr(m))
def test_blocks_reader_takes_parameterised_activations_like_the_mlp_reader(act):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5), act, nn.Linear(5, 5))
    model = nn.Sequential(nn.Linear(4, 5), act, Residual(inner, 0.5), nn.Linear(5, 3)).double()
    net = jg.Sequential.from_torch(model)
    assert net.layers[0].activation == activation_name(nn, act)
    x = torch.randn(6, 4, dtype=torch.float64)
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=1e-12, atol=1e-13)
    mlp = jg.MLP.from_torch(nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)))
    assert mlp.activations[0] == net.layers[0].activation


def test_blocks_reader_error_lists_the_supported_modules():
    with pytest.raises(TypeError, match=r"module 1 \(Softmax\) is not supported; supported: .*LeakyReLU.*nn.LayerNorm"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)))


def test_blocks_round_trip_through_torch_exactly():
    from jacgrad.interop.torch_blocks import layers_from_torch, layers_to_torch

    rng = np.random.default_rng(0)
    L = jg.layers
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)  # noqa: E731
    layers = [L.Dense(W(4, 6), rng.standard_normal(6), "leaky_relu(negative_slope=0.2)"),
              L.Residual([L.LayerNorm(1 + rng.standard_normal(6), rng.standard_normal(6), eps=1e-3),
                          L.Dense(W(6, 6), None, "gelu_tanh"),
                          L.Residual([L.RMSNorm(rng.standard_normal(6), eps=1e-4), L.Dense(W(6, 6), None, "elu")], 0.3)],
                         scale=0.5),
              L.Dense(W(6, 2))]
    model = layers_to_torch(layers)
    back = layers_from_torch(model)
    assert repr(back) == repr(layers)
    flat = lambda ls: [p for l in ls for p in l.params]  # noqa: E731
    for a, b in zip(flat(layers), flat(back), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(jg.Sequential(layers)(x), model(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-13)


def test_sequential_to_torch_and_back_and_gradients_agree():
    rng = np.random.default_rng(5)
    L = jg.layers
    W = lambda a, b: (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)  # noqa: E731
    net = jg.Sequential([L.Dense(W(3, 8), None, "silu"),
                         L.Residual([L.LayerNorm(np.ones(8, np.float32)), L.Dense(W(8, 8), None, "softplus(beta=2.0)")]),
                         L.RMSNorm(np.ones(8, np.float32)), L.Dense(W(8, 2))])
    model = net.to_torch()
    assert next(model.parameters()).dtype == torch.float32
    assert repr(jg.Sequential.from_torch(model)) == repr(net)
    x, t = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    _, g = net.loss_and_grads(x, t)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.mse_loss(model(xt), torch.tensor(t)).backward()
    np.testing.assert_allclose(g.input, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.layers[1][0]["gamma"], model[2].inner[0].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
