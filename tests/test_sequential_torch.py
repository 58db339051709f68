"""Sequential.from_torch against the torch module it reads: forward, every parameter gradient,
dx and per-sample Jacobians; every supported activation; unsupported modules name their index."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.torch

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) <= tol


def _model(dt):
    torch.manual_seed(3)
    n = 5
    m = nn.Sequential(
        nn.Linear(4, n), nn.GELU(approximate="tanh"),
        Residual(nn.Sequential(nn.LayerNorm(n), nn.Linear(n, n), nn.SiLU(), nn.Linear(n, n, bias=False)), 0.4),
        nn.RMSNorm(n), nn.Linear(n, n), nn.ELU(), nn.Identity(),
        Residual(nn.Linear(n, n), 1.5), nn.LayerNorm(n, bias=False), nn.Linear(n, 3),
    ).to(dt)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
    return m


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
def test_from_torch_matches_torch(dt):
    m = _model(dt)
    net = jg.Sequential.from_torch(m)
    assert net.dtype == (np.float64 if dt == torch.float64 else np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(net.dtype)
    gy = rng.standard_normal((6, 3)).astype(net.dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = m(xt)
    yt.backward(torch.tensor(gy))
    y, cache = net.forward(x)
    _close(y, yt.detach().numpy(), TOL[dt])
    g = net.backward(cache, gy)
    _close(g.input, xt.grad.numpy(), TOL[dt])
    _close(g.layers[0]["W"], m[0].weight.grad.numpy().T, TOL[dt])
    _close(g.layers[1][0]["gamma"], m[2].inner[0].weight.grad.numpy(), TOL[dt])
    _close(g.layers[1][0]["beta"], m[2].inner[0].bias.grad.numpy(), TOL[dt])
    _close(g.layers[1][2]["W"], m[2].inner[3].weight.grad.numpy().T, TOL[dt])
    _close(g.layers[2]["gamma"], m[3].weight.grad.numpy(), TOL[dt])
    _close(g.layers[4][0]["b"], m[7].inner.bias.grad.numpy(), TOL[dt])
    _close(g.layers[5]["gamma"], m[8].weight.grad.numpy(), TOL[dt])
    want = torch.func.vmap(torch.func.jacrev(lambda xi: m(xi[None])[0]))(torch.tensor(x)).detach().numpy()
    chain = net.jacobian_chain(cache)
    for order in ("forward", "reverse", "auto"):
        _close(chain.jacobian(order), want, TOL[dt])


ACTS = [(nn.Tanh(), "tanh"), (nn.ReLU(), "relu"), (nn.Sigmoid(), "sigmoid"), (nn.SiLU(), "silu"),
        (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.Softplus(), "softplus"),
        (nn.ELU(), "elu"), (nn.LeakyReLU(), "leaky_relu"), (nn.Hardtanh(), "hard_tanh")]


@pytest.mark.parametrize("act,name", ACTS, ids=[n for _, n in ACTS])
def test_every_activation_module(act, name):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4).double(), act)
    net = jg.Sequential.from_torch(m)
    assert net.layers[0].activation == name
    x = np.random.default_rng(1).standard_normal((5, 3)) * 2
    _close(net(x), m(torch.tensor(x)).detach().numpy(), 1e-12)


def test_unsupported_modules_name_their_index():
    with pytest.raises(TypeError, match=r"module 1 \(Dropout\(.*\)\) is in training mode"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
    with pytest.raises(TypeError, match=r"module 0 \(Tanh\): an activation must follow a layer"):
        jg.Sequential.from_torch(nn.Sequential(nn.Tanh(), nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"module 1 \(Softmax\) is not supported"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(2, 2), nn.Softmax(dim=1)))
    with pytest.raises(ValueError, match=r"Residual: the inner layers map 2 -> 3"):
        jg.Sequential.from_torch(nn.Sequential(Residual(nn.Linear(2, 3))))
