"""``jg.layers.Activation``: an activation as a layer of its own, after a norm or a residual join.

A pre-activation network (LayerNorm -> Activation, and an Activation after a residual join) against
torch autograd / torch.func: forward, every parameter gradient, the input gradient, per-sample
gradient norms and the NTK; the factor's adjoint test and its dense form; per token; save/load;
``Sequential.from_torch`` and ``jg.from_torch`` of a standalone activation; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra import check
from jacgrad.algebra.factors import DiagonalFactor

L = jg.layers


def make_net(rng, act="gelu", dtype=np.float64):
    W = lambda a, b: (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)  # noqa: E731
    v = lambda n: rng.standard_normal(n).astype(dtype)  # noqa: E731
    return jg.Sequential([
        L.Dense(W(4, 6), v(6)),
        L.LayerNorm(1 + 0.1 * v(6), v(6)), L.Activation(act),
        L.Residual([L.Dense(W(6, 6), v(6), "tanh"), L.Dense(W(6, 6), v(6))], scale=0.5), L.Activation("mish"),
        L.Dense(W(6, 3), v(3)),
    ])


def torch_forward(net):
    """A torch function of (params, x) computing ``net``, and its parameters as tensors."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fns = {"gelu": F.gelu, "mish": F.mish, "selu": F.selu, "relu": F.relu, "tanh": torch.tanh,
           "hard_swish": F.hardswish, "softsign": F.softsign, "identity": lambda x: x}
    params = [torch.tensor(p) for _, p in jg.layers.named_params(net.layers)]

    def run(layers, ps, x):
        for layer in layers:
            if layer.kind == "dense":
                W, b = next(ps), next(ps)
                x = fns[layer.activation](x @ W + b)
            elif layer.kind == "layernorm":
                g, b = next(ps), next(ps)
                x = F.layer_norm(x, (x.shape[-1],), g, b, layer.eps)
            elif layer.kind == "activation":
                x = fns[layer.activation](x)
            else:
                x = x + layer.scale * run(layer.layers, ps, x)
        return x

    return (lambda ps, x: run(net.layers, iter(ps), x)), params


def test_forward_and_gradients_match_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    net = make_net(rng)
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    f, params = torch_forward(net)
    ps = [p.clone().requires_grad_() for p in params]
    xt = torch.tensor(x, requires_grad=True)
    y = f(ps, xt)
    loss = ((y - torch.tensor(t)) ** 2).mean()
    grads = torch.autograd.grad(loss, ps + [xt])
    value, g = net.loss_and_grads(x, t)
    np.testing.assert_allclose(net(x), y.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert float(value) == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(g.flat, np.concatenate([q.numpy().ravel() for q in grads[:-1]]), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.input, grads[-1].numpy(), rtol=1e-10, atol=1e-13)
    assert g.layers[2] == {} and net.n_params == sum(p.numel() for p in params)


def test_per_sample_norms_and_ntk_match_torch_func(rng):
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, jacrev, vmap  # noqa: F401

    net = make_net(rng, act="selu")
    x, t = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))
    f, params = torch_forward(net)
    xt, tt = torch.tensor(x), torch.tensor(t)
    per = vmap(grad(lambda ps, xi, ti: ((f(ps, xi[None])[0] - ti) ** 2).mean()), in_dims=(None, 0, 0))(params, xt, tt)
    norms = torch.sqrt(sum((g.reshape(len(x), -1) ** 2).sum(1) for g in per))
    np.testing.assert_allclose(net.per_sample_grad_norms(x, t), norms.numpy(), rtol=1e-10)
    J = jacrev(lambda ps: f(ps, xt))(params)  # each (N, O, *shape)
    Jflat = torch.cat([j.reshape(len(x), 3, -1) for j in J], dim=2)
    K = torch.einsum("aop,bqp->aboq", Jflat, Jflat)
    np.testing.assert_allclose(jg.ntk(net, x), K.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jg.ntk(net, x, trace=True), torch.einsum("aop,bop->ab", Jflat, Jflat).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_jacobian_and_ggn_match_dense_references(rng):
    net = make_net(rng, act="softsign")
    x = rng.standard_normal((3, 4))
    numeric = np.stack([check.numerical_jacobian(lambda z: net(z[None])[0], x[i]) for i in range(3)])
    np.testing.assert_allclose(net.jacobian(x), numeric, rtol=1e-6, atol=1e-8)
    for order in ("forward", "reverse"):
        np.testing.assert_allclose(net.jacobian(x, order=order), net.jacobian(x), rtol=1e-12, atol=1e-14)
    v = rng.standard_normal(net.n_params)
    diag = net.ggn_diagonal(x).flat
    e = np.zeros(net.n_params)
    for k in rng.choice(net.n_params, 5, replace=False):
        e[:] = 0
        e[k] = 1
        assert net.ggn_vp(x, e)[k] == pytest.approx(diag[k], rel=1e-10, abs=1e-14)
    assert net.ggn_vp(x, v).shape == (net.n_params,)


def test_factor_is_diag_of_the_derivative_and_passes_the_adjoint_test(rng):
    act = jg.activations.get("hard_swish")
    h = rng.normal(0, 3, (5, 7))
    layer = L.Activation("hard_swish", 7)
    y, state = layer.forward(h)
    np.testing.assert_array_equal(y, act.f(h))
    F = layer.factor(state)
    assert isinstance(F, DiagonalFactor) and F.batch == 5
    D = F.dense()
    np.testing.assert_array_equal(D, np.stack([np.diag(d) for d in act.df(h)]))
    u, v = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    assert abs((v * F.jvp(u)).sum() - (F.vjp(v) * u).sum()) < 1e-12
    np.testing.assert_allclose(F.singular_values(), np.linalg.svd(D, compute_uv=False), rtol=1e-14)
    np.testing.assert_allclose(F.norm_bound(), np.linalg.norm(D, 2, axis=(1, 2)), rtol=1e-14)
    A = rng.standard_normal((5, 2, 7))
    np.testing.assert_allclose(F.vjp_stack(A), np.einsum("brn,bnm->brm", A, D), rtol=1e-14)
    assert F.rows([1, 3]).batch == 2


def test_per_token_matches_rows(rng):
    layer = L.Activation("gelu", 4)
    x = rng.standard_normal((3, 5, 4))
    y, state = layer.forward(x)
    np.testing.assert_array_equal(y, jg.activations.get("gelu").f(x))
    g = rng.standard_normal((3, 5, 4))
    gin, delta = layer.backward(state, g, [])
    np.testing.assert_allclose(gin, g * jg.activations.get("gelu").df(x), rtol=1e-15)
    np.testing.assert_array_equal(delta, g)  # its δ: the cotangent at its output, as for the norms
    np.testing.assert_allclose(layer.factor(state).vjp(g), gin, rtol=1e-15)
    net = jg.Sequential([L.Dense(rng.standard_normal((4, 4))), L.Activation("silu"), L.Dense(rng.standard_normal((4, 2)))])
    xt = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(net(xt), np.stack([net(xt[:, t]) for t in range(3)], axis=1), rtol=1e-14)


def test_compiled_step_gives_the_numbers_of_loss_and_grads(rng):
    net = make_net(rng, act="relu")
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    step = net.compile(5)
    loss, g = step(x, t, copy=True)
    value, ref = net.loss_and_grads(x, t)
    assert float(loss) == pytest.approx(float(value), rel=1e-14)
    np.testing.assert_allclose(g.flat, ref.flat, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(rng, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    net = make_net(rng, act="leaky_relu(negative_slope=0.2)")
    path = tmp_path / f"net{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    assert [repr(a) for a in back.layers] == [repr(a) for a in net.layers]
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(back(x), net(x))


def test_width_comes_from_the_layer_before(rng):
    net = jg.Sequential([L.Dense(np.ones((3, 5))), L.Activation("tanh"),
                         L.Residual([L.Dense(np.eye(5)), L.Activation("relu")])])
    assert net.layers[1].n_in == 5 and net.layers[2].layers[1].n_out == 5
    assert repr(net.layers[1]) == "Activation('tanh', 5)"


def test_bad_input_is_named():
    with pytest.raises(KeyError, match=r"unknown activation 'swishy'; valid names: identity, relu.*mish, selu"):
        L.Activation("swishy", 3)
    with pytest.raises(ValueError, match="width must be an int"):
        L.Activation("relu", 0)
    with pytest.raises(ValueError, match="layer 0 .* has no width"):
        jg.Sequential([L.Activation("relu"), L.Dense(np.ones((3, 2)))])
    with pytest.raises(ValueError, match="at least one layer with parameters"):
        jg.Sequential([L.Activation("relu", 3)])
    with pytest.raises(ValueError, match=r"takes 4 features but layer 0"):
        jg.Sequential([L.Dense(np.ones((3, 2))), L.Activation("relu", 4)])
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        L.Activation("relu", 3).forward(np.ones((2, 4)))
    with pytest.raises(ValueError, match="no width yet"):
        L.Activation("relu").forward(np.ones((2, 4)))


def test_sequential_from_torch_reads_a_standalone_activation(rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 6), nn.Mish(), nn.SELU(),
                      nn.Linear(6, 2)).double()
    net = jg.Sequential.from_torch(m)
    assert [type(a).__name__ for a in net.layers] == ["Dense", "LayerNorm", "Activation", "Dense", "Activation", "Dense"]
    assert net.layers[3].activation == "mish" and net.layers[4].activation == "selu"
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(net(x), m(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-14)
    back = net.to_torch()
    np.testing.assert_allclose(back(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-12, atol=1e-14)


def test_graph_import_makes_standalone_activations_layers(rng):
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.fc, self.out = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.fc(F.hardswish(self.norm(h)))
            return self.out(F.softsign(F.selu(h)))

    m = PreAct().double()
    x = rng.standard_normal((5, 4))
    net = jg.from_torch(m, torch.tensor(x))
    kinds = [(a.kind, getattr(a, "activation", None)) for a in net.layers]
    assert ("activation", "selu") in kinds and ("activation", "softsign") in kinds
    assert [(a.kind, getattr(a, "activation", None)) for a in net.layers[1].layers][1] == ("activation", "hard_swish")
    np.testing.assert_allclose(net(x), m(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-14)
