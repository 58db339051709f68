"""``jg.layers.PReLU`` (torch's ``nn.PReLU``: one slope, or one per channel) as a parameterised
activation layer: forward, every parameter gradient, per-sample gradients and their norms (all
three methods), the NTK and the Gauss–Newton products against torch.func in float64 (1e-10) and
float32 (1e-4), on ``(B, n)`` rows and on images; read by ``jg.from_torch`` (graph op ``prelu``)
and by ``jg.Sequential.from_torch`` (the module walk); files.

The reference swaps each ``nn.PReLU`` for the explicit ``max(x, 0) + a·min(x, 0)`` with the same
parameter (torch.func's ``jacrev`` of ``aten.prelu`` under ``vmap`` fails in torch 2.13), so the
reference is torch autograd of the formula, not of jacgrad's code."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch autograd / torch.func")
nn = torch.nn

import jacgrad as jg  # noqa: E402
from test_torch_capture import _check_against_torch, _sources, _torch_flat  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")


class FormulaPReLU(nn.Module):
    """``max(x, 0) + a·min(x, 0)`` with ``a`` broadcast along axis 1 (torch's channel axis)."""

    def __init__(self, prelu):
        super().__init__()
        self.weight = prelu.weight

    def forward(self, x):
        a = self.weight if self.weight.numel() == 1 else self.weight.reshape((-1,) + (1,) * (x.ndim - 2))
        return x.clamp(min=0) + a * x.clamp(max=0)


def _reference(model):
    """A copy of ``model`` with every ``nn.PReLU`` computed by the formula (the same numbers)."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        for child, c in list(m.named_children()):
            if type(c) is nn.PReLU:
                setattr(m, child, FormulaPReLU(c))
    return ref


def _dense(k, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(k), nn.Linear(4, 2)).to(dtype).eval()
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(k, dtype=dtype))
    return model


def _images(k, dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.PReLU(k), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    model = model.to(dtype).eval()
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(k, dtype=dtype))
    return model


CASES = [(_dense, 4, (6, 3)), (_dense, 1, (6, 3)), (_images, 3, (5, 2, 5, 5)), (_images, 1, (5, 2, 5, 5))]


@pytest.mark.parametrize("make, k, shape", CASES)
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 1e-4)])
def test_prelu_layer_read_by_the_module_walk_matches_torch(make, k, shape, dtype, rtol):
    model = make(k, getattr(torch, dtype))
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    net = jg.Sequential.from_torch(model, in_shape=shape[1:] if len(shape) > 2 else None)
    prelu = net.layers[1]
    assert isinstance(prelu, jg.layers.PReLU) and prelu.num_parameters == k
    assert prelu.in_shape == ((3, 5, 5) if len(shape) > 2 else (4,))
    np.testing.assert_allclose(net(x), model(torch.as_tensor(x)).detach().numpy(), rtol=rtol, atol=rtol)
    _check_against_torch(_reference(model), net, x, rtol)


@pytest.mark.parametrize("make, k, shape", CASES)
def test_per_sample_gradients_and_gauss_newton_products_of_the_slopes(make, k, shape):
    model = _reference(make(k, torch.float64))
    x = np.random.default_rng(3).standard_normal(shape)
    t = np.random.default_rng(4).standard_normal((shape[0], 2))
    net = jg.Sequential.from_torch(make(k, torch.float64), in_shape=shape[1:] if len(shape) > 2 else None)
    sources = _sources(net, model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0]

    X, T, B = torch.as_tensor(x), torch.as_tensor(t), shape[0]
    per = torch.func.vmap(torch.func.grad(lambda p, xi, ti: ((f(p, xi) - ti) ** 2).mean()), in_dims=(None, 0, 0))(
        params, X, T)
    want = np.stack([_torch_flat(model, sources, {n: v[i] for n, v in per.items()}) for i in range(B)])
    g = net.per_sample_grads(x, t)
    np.testing.assert_allclose(g.flat, want, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.layers[1]["weight"], per["1.weight"].numpy(), rtol=1e-10, atol=1e-13)
    for method in ("auto", "gram", "instantiate"):
        np.testing.assert_allclose(net.per_sample_grad_norms(x, t, method=method), np.linalg.norm(want, axis=1),
                                   rtol=1e-10)
    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
    J = np.stack([np.stack([_torch_flat(model, sources, {n: v[i, o] for n, v in jac.items()}) for o in range(2)])
                  for i in range(B)])
    G = np.einsum("iop,ioq->pq", J, J) / B                                   # mse over 2 outputs: H_i = I
    v = np.random.default_rng(5).standard_normal(net.n_params)
    np.testing.assert_allclose(net.ggn_vp(x, v, t), G @ v, rtol=1e-10, atol=1e-12 * np.abs(G @ v).max())
    np.testing.assert_allclose(net.ggn_diagonal(x, t).flat, np.diag(G), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J, J), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [3, 1])
def test_graph_import_reads_the_prelu_op(k):
    model = _images(k, torch.float64)
    x = np.random.default_rng(6).standard_normal((4, 2, 5, 5))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers] == ["Conv2d", "PReLU", "Flatten", "Dense"]
    assert net.layers[1].in_shape == (3, 5, 5)
    out = jg.explain(model, torch.as_tensor(x), file=False)
    assert {r.node: r.layer for r in out.rows}["prelu"] == f"layer 1: PReLU({k})"
    _check_against_torch(_reference(model), net, x, 1e-10)


def test_prelu_saves_and_loads(tmp_path):
    net = jg.Sequential.from_torch(_images(3, torch.float64), in_shape=(2, 5, 5))
    x = np.random.default_rng(7).standard_normal((2, 2, 5, 5))
    net.save(tmp_path / "p.safetensors")
    back = jg.Sequential.load(tmp_path / "p.safetensors")
    assert repr(back) == repr(net)
    np.testing.assert_array_equal(back(x), net(x))


def test_bad_slopes_and_shapes_are_refused():
    with pytest.raises(ValueError, match=r"PReLU: weight must be \(1,\) or \(C,\), got shape \(2, 2\)"):
        jg.layers.PReLU(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"PReLU\(3\): in_shape \(4, 5, 5\) is not .* with C = 3"):
        jg.layers.PReLU(np.ones(3), in_shape=(4, 5, 5))
    L = jg.layers.PReLU(np.ones(3), in_shape=(3, 2))
    with pytest.raises(ValueError, match=r"the input has shape \(1, 3, 4\) but the layer takes \(B, 3, 2\)"):
        L.forward(np.ones((1, 3, 4)))
