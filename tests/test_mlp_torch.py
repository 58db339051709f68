"""MLP against PyTorch autograd: every activation × every loss × float32/float64 — loss,
weight/bias/input gradients, and the per-sample Jacobian chain against
``torch.func.vmap(torch.func.jacrev(...))``. Skipped where torch is not importable."""

import zlib

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import relative_error

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch

TORCH_ACT = {
    "identity": lambda h: h,
    "relu": F.relu,
    "leaky_relu": lambda h: F.leaky_relu(h, 0.01),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "elu": F.elu,
    "gelu": lambda h: F.gelu(h, approximate="none"),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "hard_tanh": F.hardtanh,
    "mish": F.mish,
    "selu": F.selu,
    "hard_swish": F.hardswish,
    # torch's own float64 hardsigmoid backward multiplies by a float32 1/6: its definition, composed
    "hard_sigmoid": lambda h: F.hardtanh(h + 3.0, 0.0, 6.0) / 6.0,
    "softsign": F.softsign,
    "log_sigmoid": F.logsigmoid,
}

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def test_the_torch_table_covers_every_activation():
    assert sorted(TORCH_ACT) == sorted(jg.activations.names())


def torch_forward(net, x):
    z = x
    params = []
    for W, b, act in zip(net.weights, net.biases, net.activations):
        Wt = torch.tensor(W, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        params += [Wt, bt]
        z = TORCH_ACT[act](z @ Wt + bt)
    return z, params


def make_target(loss, rng, B, C, dtype):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, C, size=B)
    if loss == "sigmoid_bce":
        return rng.uniform(0, 1, size=(B, C)).astype(dtype)
    return rng.standard_normal((B, C)).astype(dtype)


def torch_loss(loss, y, t):
    if loss == "mse":
        return F.mse_loss(y, torch.tensor(t))
    if loss == "softmax_cross_entropy":
        return F.cross_entropy(y, torch.tensor(t))
    return F.binary_cross_entropy_with_logits(y, torch.tensor(t))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy", "sigmoid_bce"])
@pytest.mark.parametrize("activation", sorted(TORCH_ACT))
def test_loss_and_gradients_match_torch(activation, loss, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{activation}-{loss}".encode()))
    B, sizes = 7, [6, 9, 8, 4]
    net = jg.MLP.init(sizes, activation=activation, init="he_normal", bias_std=0.2, seed=3, dtype=dtype.__name__)
    x = rng.standard_normal((B, sizes[0])).astype(dtype)
    t = make_target(loss, rng, B, sizes[-1], dtype)

    value, g = net.loss_and_grads(x, t, loss)

    xt = torch.tensor(x, requires_grad=True)
    yt, params = torch_forward(net, xt)
    lt = torch_loss(loss, yt, t)
    lt.backward()
    tol = TOL[dtype]
    assert value.dtype == dtype
    assert relative_error(value, lt.detach().numpy()) < tol
    for j in range(net.depth):
        assert relative_error(g.weights[j], params[2 * j].grad.numpy()) < tol, f"layer {j} weights"
        assert relative_error(g.biases[j], params[2 * j + 1].grad.numpy()) < tol, f"layer {j} biases"
    assert relative_error(g.input, xt.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", sorted(TORCH_ACT))
def test_jacobian_chain_matches_vmapped_jacrev(activation, dtype):
    rng = np.random.default_rng(7)
    sizes = [5, 8, 3, 6]
    net = jg.MLP.init(sizes, activation=activation, output_activation=activation, bias_std=0.3, seed=4,
                      dtype=dtype.__name__)
    x = rng.standard_normal((6, sizes[0])).astype(dtype)
    _, cache = net.forward(x)
    C = net.jacobian_chain(cache)

    def f(xb):
        return torch_forward(net, xb)[0]

    ref = torch.func.vmap(torch.func.jacrev(f))(torch.tensor(x)).detach().numpy()
    for order in jg.chain.ORDERS:
        J = C.jacobian(order)
        assert J.dtype == dtype
        assert relative_error(J, ref) < TOL[dtype], order
