"""Sequential of Dense / Residual / LayerNorm / RMSNorm against PyTorch autograd on the equivalent
torch modules: forward, every parameter gradient (W, b, gamma, beta), dx, and the per-sample
Jacobian in all three orders against ``torch.func.vmap(torch.func.jacrev(...))``."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch

TOL = {np.float64: 1e-12, np.float32: 1e-5}
TORCH_DT = {np.float64: torch.float64, np.float32: torch.float32}


class TorchResidual(nn.Module):
    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return x + self.scale * self.inner(x)


def _torch_net(dtype, scale=0.7):
    """A torch net and the matching jacgrad layers, built independently from the same numbers."""
    torch.manual_seed(0)
    n = 6
    lin = lambda a, b: nn.Linear(a, b, dtype=TORCH_DT[dtype])
    tnet = nn.Sequential(
        lin(3, n), nn.Tanh(),
        TorchResidual(nn.Sequential(lin(n, n), nn.GELU(), lin(n, n), nn.Tanh()), scale),
        nn.LayerNorm(n, eps=1e-5, dtype=TORCH_DT[dtype]),
        lin(n, n), nn.Sigmoid(),
        TorchResidual(nn.Sequential(nn.RMSNorm(n, eps=1e-6, dtype=TORCH_DT[dtype]), lin(n, n), nn.Tanh()), 0.3),
        nn.RMSNorm(n, eps=1e-6, dtype=TORCH_DT[dtype]),
        lin(n, 2),
    )
    with torch.no_grad():  # non-trivial gamma and beta
        for m in tnet.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.copy_(1.0 + 0.3 * torch.randn(n, dtype=m.weight.dtype))
            if isinstance(m, nn.LayerNorm):
                m.bias.copy_(0.2 * torch.randn(n, dtype=m.bias.dtype))
    a = lambda t: t.detach().numpy().copy()
    L = jg.layers
    dense = lambda m, act: L.Dense(a(m.weight).T.copy(), a(m.bias), act)
    res1 = tnet[2].inner
    res2 = tnet[6].inner
    layers = [
        dense(tnet[0], "tanh"),
        L.Residual([dense(res1[0], "gelu"), dense(res1[2], "tanh")], scale),
        L.LayerNorm(a(tnet[3].weight), a(tnet[3].bias), eps=1e-5),
        dense(tnet[4], "sigmoid"),
        L.Residual([L.RMSNorm(a(res2[0].weight), eps=1e-6), dense(res2[1], "tanh")], 0.3),
        L.RMSNorm(a(tnet[7].weight), eps=1e-6),
        dense(tnet[8], "identity"),
    ]
    # the torch parameters in jacgrad's flat order (Dense: W = weightᵀ, b; norms: gamma, beta)
    order = [tnet[0], res1[0], res1[2], tnet[3], tnet[4], res2[0], res2[1], tnet[7], tnet[8]]
    return tnet, jg.Sequential(layers), order


def _close(got, want, tol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, err


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_gradients_and_dx_match_torch(dtype):
    tnet, net, order = _torch_net(dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3)).astype(dtype)
    gy = rng.standard_normal((5, 2)).astype(dtype)
    y, cache = net.forward(x)
    xt = torch.tensor(x, requires_grad=True)
    yt = tnet(xt)
    _close(y, yt.detach().numpy(), TOL[dtype])
    yt.backward(torch.tensor(gy))
    g = net.backward(cache, gy)
    _close(g.input, xt.grad.numpy(), TOL[dtype])
    want = []
    for m in order:
        if isinstance(m, nn.Linear):
            want += [m.weight.grad.numpy().T.ravel(), m.bias.grad.numpy()]
        else:
            want += [m.weight.grad.numpy()] + ([m.bias.grad.numpy()] if getattr(m, "bias", None) is not None else [])
    _close(g.flat, np.concatenate(want), TOL[dtype])
    # the named views are the flat block's, layer by layer
    _close(g.layers[0]["W"], tnet[0].weight.grad.numpy().T, TOL[dtype])
    _close(g.layers[2]["gamma"], tnet[3].weight.grad.numpy(), TOL[dtype])
    _close(g.layers[2]["beta"], tnet[3].bias.grad.numpy(), TOL[dtype])
    _close(g.layers[4][0]["gamma"], tnet[6].inner[0].weight.grad.numpy(), TOL[dtype])
    _close(g.layers[1][1]["b"], tnet[2].inner[2].bias.grad.numpy(), TOL[dtype])
    assert np.shares_memory(g.layers[1][0]["W"], g.flat)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("order", ["forward", "reverse", "auto"])
def test_per_sample_jacobian_matches_vmap_jacrev(dtype, order):
    tnet, net, _ = _torch_net(dtype)
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(dtype)
    want = torch.func.vmap(torch.func.jacrev(lambda xi: tnet(xi[None])[0]))(torch.tensor(x)).detach().numpy()
    chain = net.jacobian_chain(net.forward(x)[1])
    assert chain.structured
    _close(chain.jacobian(order), want, TOL[dtype])
    # matrix-free products and spectra through the same factors
    u = np.random.default_rng(3).standard_normal((4, 3)).astype(dtype)
    _close(chain.jvp(u), np.einsum("bij,bj->bi", want, u), TOL[dtype])
    v = np.random.default_rng(4).standard_normal((4, 2)).astype(dtype)
    _close(chain.vjp(v), np.einsum("bij,bi->bj", want, v), TOL[dtype])
    if dtype == np.float64:
        _close(chain.spectral_norm("lanczos"), np.linalg.svd(want, compute_uv=False)[:, 0], 1e-10)


def test_loss_and_grads_is_backward_of_the_loss():
    tnet, net, order = _torch_net(np.float64)
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    value, g = net.loss_and_grads(x, t, loss="mse")
    lt = torch.nn.functional.mse_loss(tnet(torch.tensor(x)), torch.tensor(t))
    lt.backward()
    _close(value, lt.item(), 1e-12)
    _close(g.layers[6]["W"], tnet[8].weight.grad.numpy().T, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_per_sample_grad_norms_match_vmap_grad(dtype):
    tnet, net, order = _torch_net(dtype)
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal((5, 2)).astype(dtype)
    params = {k: v.detach() for k, v in tnet.named_parameters()}

    def loss_i(p, xi, ti):
        y = torch.func.functional_call(tnet, p, (xi[None],))
        return torch.nn.functional.mse_loss(y, ti[None])

    per = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, torch.tensor(x), torch.tensor(t))
    want = np.sqrt(sum((v.reshape(5, -1).numpy().astype(np.float64) ** 2).sum(1) for v in per.values()))
    _close(net.per_sample_grad_norms(x, t), want, TOL[dtype])
    # per layer: layer 1 (the first residual block) holds torch's module 2
    blk = [k for k in per if k.startswith("2.")]
    want1 = np.sqrt(sum((per[k].reshape(5, -1).numpy().astype(np.float64) ** 2).sum(1) for k in blk))
    _close(net.per_sample_grad_norms(x, t, per_layer=True)[:, 1], want1, TOL[dtype])
