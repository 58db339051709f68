"""Issue 22, item 2: shared modules and tied weights. One parameter used in several places is one
parameter: its gradient is the sum over its uses, P counts it once, and per-sample norms, the NTK
and the Gauss–Newton products carry the cross terms between its uses.

Every number is checked against torch.func on the torch model itself (float64 to 1e-10, float32
to 1e-4): the loss, every parameter's gradient, the per-sample gradients and their norms, the
clipped gradient, the NTK (``vmap(jacrev)``), and ``ggn_vp`` / ``ggn_diagonal`` against the dense
``(1/B) Σ_i J_iᵀ H_i J_i`` built from ``jacrev`` and ``hessian`` of the per-sample loss."""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch.func")
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, hessian, jacrev, vmap  # noqa: E402

import jacgrad as jg  # noqa: E402
from jacgrad.protocol.sharing import Ties  # noqa: E402

L = jg.layers
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


# ---------------------------------------------------------------------- the models
class ReusedLinear(nn.Module):
    """One nn.Linear applied twice (a custom module: the graph importer reads it)."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(torch.tanh(self.inp(x)))))))


class TiedLinears(nn.Module):
    """Two Linears sharing a weight (``b.weight = a.weight``), biases their own."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.inp(x)))))))


def reused_sequential(dtype=torch.float64):
    """(i) an nn.Sequential listing one nn.Linear twice."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def tied_unembedding(dtype=torch.float64, V: int = 9, d: int = 6):
    """(iii) embedding -> LayerNorm -> tied unembedding (``head.weight = emb.weight``: jacgrad's
    ``Dense(E.T)``)."""
    torch.manual_seed(2)
    emb, ln, head = nn.Embedding(V, d), nn.LayerNorm(d), nn.Linear(d, V)
    head.weight = emb.weight
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(d))
        ln.bias.add_(0.3 * torch.randn(d))
        head.bias.add_(0.3 * torch.randn(V))
    return nn.Sequential(emb, ln, head).to(dtype)


def _data(kind, dtype, B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        x = torch.randint(0, 9, (B, 4), generator=g)
        return x, torch.randn(B, 4, 9, generator=g, dtype=dtype)
    return torch.randn(B, 3, generator=g, dtype=dtype), torch.randn(B, 2, generator=g, dtype=dtype)


# ---------------------------------------------------------------------- torch.func references
def _layout(net, model):
    """Per jacgrad parameter (``Gradients.flat`` order), the torch parameter it is, whether jacgrad
    holds it transposed, and the block of its last axis it is (``(lo, hi)``: a fused projection such
    as ``in_proj_weight`` split into q, k, v; None: all of it): matched by value (random init:
    unambiguous)."""
    named = dict(model.named_parameters())  # tied parameters once
    out = []
    for p in net._ties().params:
        a = np.asarray(jg.to_numpy(p))
        hits = []
        for n, t in named.items():
            t = t.detach().numpy()
            for tr in (False, True)[:t.ndim]:
                q = t.T if tr else t
                if q.shape == a.shape and np.array_equal(q, a):
                    hits.append((n, tr, None))
                elif q.ndim == a.ndim and q.shape[:-1] == a.shape[:-1] and q.shape[-1] > a.shape[-1] \
                        and q.shape[-1] % a.shape[-1] == 0:
                    w = a.shape[-1]
                    hits += [(n, tr, (lo, lo + w)) for lo in range(0, q.shape[-1], w) if np.array_equal(q[..., lo:lo + w], a)]
        assert len(hits) == 1, hits
        out.append(hits[0])
    assert sorted({n for n, _, _ in out}) == sorted(named), "every torch parameter is one jacgrad parameter"
    return out


def _flat(tensors: dict, layout, lead: int = 0):
    """torch's per-parameter arrays (each with ``lead`` leading axes) in jacgrad's flat layout."""
    parts = []
    for name, t, cols in layout:
        a = tensors[name].detach()
        if t:
            a = a.transpose(-1, -2)
        if cols is not None:
            a = a[..., cols[0]:cols[1]]
        parts.append(a.reshape(tuple(a.shape[:lead]) + (-1,)))
    return torch.cat(parts, dim=-1).numpy()


class Ref:
    """The torch.func reference quantities of ``model`` on ``(x, t)`` with the mse loss."""

    def __init__(self, model, net, x, t):
        # a copy (ties kept): functional_call leaves a module listed twice holding its stand-in tensors
        model = copy.deepcopy(model)
        self.model, self.x, self.t = model, x, t
        self.layout = _layout(net, model)
        self.params = {n: p.detach() for n, p in model.named_parameters()}

    def f(self, p, x):
        return functional_call(self.model, p, (x,))

    def loss(self, p, x, t):
        return ((self.f(p, x) - t) ** 2).mean()

    def value_and_grad(self):
        return float(self.loss(self.params, self.x, self.t)), _flat(grad(self.loss)(self.params, self.x, self.t), self.layout)

    def per_sample(self):
        g = vmap(grad(lambda p, x, t: self.loss(p, x[None], t[None])), in_dims=(None, 0, 0))(self.params, self.x, self.t)
        return _flat(g, self.layout, lead=1)

    def jacobian(self, x):
        """``(N, O, P)``: every sample's output (flattened) against the parameters."""
        J = vmap(jacrev(lambda p, x: self.f(p, x[None])[0].reshape(-1)), in_dims=(None, 0))(self.params, x)
        return _flat(J, self.layout, lead=2)

    def ggn(self):
        """Dense ``(1/B) Σ_i J_iᵀ H_i J_i``, ``H_i`` the torch.func Hessian of sample i's loss in its output."""
        J = self.jacobian(self.x)
        y = self.f(self.params, self.x).detach()
        H = vmap(hessian(lambda yi, ti: ((yi - ti) ** 2).mean()))(y.reshape(len(y), -1), self.t.reshape(len(y), -1))
        return np.einsum("bop,boq,bqr->pr", J, H.numpy(), J, optimize=True) / len(y)


def _check_all(net, model, x, t, dtype):
    tol = TOL[dtype]
    xn, tn = x.numpy(), t.numpy()
    ref = Ref(model, net, x, t)
    assert net.n_params == sum(p.numel() for p in model.parameters())
    value, g_ref = ref.value_and_grad()
    loss, g = net.loss_and_grads(xn, tn)
    np.testing.assert_allclose(float(loss), value, **tol)
    np.testing.assert_allclose(g.flat, g_ref, **tol)
    ps = ref.per_sample()
    np.testing.assert_allclose(net.per_sample_grads(xn, tn).flat, ps, **tol)
    np.testing.assert_allclose(net.per_sample_grad_norms(xn, tn), np.linalg.norm(ps, axis=1), **tol)
    per_layer = net.per_sample_grad_norms(xn, tn, per_layer=True)
    np.testing.assert_allclose((per_layer ** 2).sum(axis=1), (ps ** 2).sum(axis=1), **tol)
    C = float(np.median(np.linalg.norm(ps, axis=1)))
    r = net.clipped_grad(xn, tn, max_norm=C)
    c = np.minimum(1.0, C / np.linalg.norm(ps, axis=1))
    np.testing.assert_allclose(r.flat, (c[:, None] * ps).sum(axis=0) / len(xn), **tol)
    J = ref.jacobian(x)
    x2 = x[:3]
    J2 = ref.jacobian(x2)
    np.testing.assert_allclose(jg.ntk(net, xn), np.einsum("aop,bqp->aboq", J, J), **tol)
    np.testing.assert_allclose(jg.ntk(net, xn, x2.numpy(), trace=True), np.einsum("aop,bop->ab", J, J2), **tol)
    G = ref.ggn()
    v = np.random.default_rng(3).standard_normal(net.n_params).astype(xn.dtype if xn.dtype.kind == "f" else tn.dtype)
    np.testing.assert_allclose(net.ggn_vp(xn, v), G @ v, **tol)
    np.testing.assert_allclose(net.ggn_diagonal(xn).flat, np.diag(G), **tol)
    return g


# ---------------------------------------------------------------------- (i) a Linear used twice
@pytest.mark.parametrize("importer", ["Sequential", "MLP"])
@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_a_linear_used_twice_in_an_nn_sequential(importer, copy_, dtype):
    model = reused_sequential(dtype)
    net = getattr(jg, importer).from_torch(model, copy=copy_)
    assert len(net.layers) == 4 and net.layers[1].W is net.layers[2].W and net.layers[1].b is net.layers[2].b
    x, t = _data("dense", dtype)
    g = _check_all(net, model, x, t, dtype)
    assert g.layers[1]["W"] is g.layers[2]["W"] or np.shares_memory(g.layers[1]["W"], g.layers[2]["W"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_a_linear_used_twice_in_a_custom_module_through_the_graph(dtype):
    torch.manual_seed(4)
    model = ReusedLinear().to(dtype)
    x, t = _data("dense", dtype)
    net = jg.from_torch(model, x)
    _check_all(net, model, x, t, dtype)


# ---------------------------------------------------------------------- (ii) tied weights
@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_two_linears_sharing_a_weight_through_the_graph(copy_, dtype):
    torch.manual_seed(5)
    model = TiedLinears().to(dtype)
    x, t = _data("dense", dtype)
    net = jg.from_torch(model, x, copy=copy_)
    assert net.n_params == 20 + 30 + 5 + 12 and net.layers[1].W is net.layers[2].W
    assert net.layers[1].b is not net.layers[2].b
    _check_all(net, model, x, t, dtype)


def test_tied_weights_in_an_nn_sequential_by_the_module_walk():
    torch.manual_seed(6)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), a, nn.Tanh(), b, nn.Tanh(), nn.Linear(4, 2)).double()
    net = jg.Sequential.from_torch(model)
    x, t = _data("dense", torch.float64)
    _check_all(net, model, x, t, torch.float64)


# ---------------------------------------------------------------------- (iii) tied unembedding
@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_embedding_layernorm_tied_unembedding(copy_, dtype):
    model = tied_unembedding(dtype)
    net = jg.Sequential.from_torch(model, copy=copy_)
    E, W = net.layers[0].params[0], net.layers[2].W
    assert W.shape == E.shape[::-1] and np.shares_memory(W, E) and net._ties().uses[-2] == (0, True)
    x, t = _data("tokens", dtype)
    g = _check_all(net, model, x, t, dtype)
    np.testing.assert_array_equal(g.layers[2]["W"], g.layers[0]["E"].T)  # one gradient, seen from both uses


def test_the_tied_unembedding_built_from_jacgrad_layers_is_the_torch_model():
    """The public spelling: ``Dense(E.T)`` reads the Embedding's own table."""
    model = tied_unembedding()
    emb, ln, head = model
    E = emb.weight.detach().numpy().copy()
    net = jg.Sequential([L.Embedding(E), L.LayerNorm(ln.weight.detach().numpy().copy(), ln.bias.detach().numpy().copy()),
                         L.Dense(E.T, head.bias.detach().numpy().copy())])
    x, t = _data("tokens", torch.float64)
    _check_all(net, model, x, t, torch.float64)


def test_a_view_import_follows_in_place_updates_of_the_tied_table():
    model = tied_unembedding()
    net = jg.Sequential.from_torch(model, copy=False)
    x, _ = _data("tokens", torch.float64)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
        want = model(x).numpy()
    np.testing.assert_allclose(net(x.numpy()), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- files, compiled steps
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_file_stores_a_shared_parameter_once_and_restores_the_tie(tmp_path, suffix):
    model = tied_unembedding()
    net = jg.Sequential.from_torch(model)
    path = tmp_path / f"net{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    assert back.n_params == net.n_params and back.layers[2].W.base is not None
    assert np.shares_memory(back.layers[2].W, back.layers[0].params[0])
    x, t = _data("tokens", torch.float64)
    np.testing.assert_array_equal(back.loss_and_grads(x.numpy(), t.numpy())[1].flat,
                                  net.loss_and_grads(x.numpy(), t.numpy())[1].flat)
    if suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            names = sorted(zf.namelist())
        assert "2.W.npy" not in names and "0.E.npy" in names and "ties.npy" in names


def test_a_file_whose_ties_name_no_stored_parameter_is_refused(tmp_path):
    net = jg.Sequential.from_torch(reused_sequential())
    path = tmp_path / "net.npz"
    net.save(path)
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    assert json.loads(str(members["ties"])) == {"2.W": ["1.W", False], "2.b": ["1.b", False]}
    members["ties"] = np.array(json.dumps({"2.W": ["7.W", False], "2.b": ["1.b", False]}))
    np.savez(path, **members)
    with pytest.raises(ValueError, match=r"'ties': '2.W' names '7.W', which is not a stored parameter"):
        jg.Sequential.load(path)
    members["ties"] = np.array(json.dumps(["2.W"]))
    np.savez(path, **members)
    with pytest.raises(ValueError, match=r"its 'ties' is not a JSON object"):
        jg.Sequential.load(path)


# ---------------------------------------------------------------------- bad input
def test_arrays_overlapping_without_being_one_parameter_are_refused():
    W = np.random.default_rng(0).standard_normal((6, 6))
    with pytest.raises(ValueError, match=r"layer 0 \(Dense\) W \(6, 6\) and layer 1 \(Dense\) W \(6, 4\) share memory but "
                                         r"are neither the same array nor its transpose"):
        jg.Sequential([L.Dense(W, None, "tanh"), L.Dense(W[:, :4])])
    flat = np.zeros(12)
    with pytest.raises(ValueError, match=r"share memory"):
        jg.Sequential([L.Dense(flat.reshape(3, 4)), L.Dense(flat[:8].reshape(4, 2))])


def test_a_square_array_and_its_transpose_are_one_parameter_and_a_copy_is_another():
    E = np.random.default_rng(0).standard_normal((6, 6))
    net = jg.Sequential([L.Dense(E, None, "tanh"), L.Dense(E.T)])
    assert net.n_params == 36 + 12 and net._ties().uses[2] == (0, True)
    assert jg.Sequential([L.Dense(E, None, "tanh"), L.Dense(E.T.copy())]).n_params == 2 * (36 + 6)


def test_a_part_of_an_array_is_not_a_tie():
    E = np.random.default_rng(0).standard_normal((6, 6))
    with pytest.raises(ValueError, match="share memory"):
        jg.Sequential([L.Dense(E, None, "tanh"), L.Dense(E[:, :3])])


def test_clipped_grad_takes_one_trainable_flag_per_parameter():
    net = jg.Sequential.from_torch(reused_sequential())
    x, t = _data("dense", torch.float64)
    with pytest.raises(ValueError, match=r"trainable has 8 flags but the network has 6 parameter arrays \(a shared one once"):
        net.clipped_grad(x.numpy(), t.numpy(), max_norm=1.0, trainable=[True] * 8)
    frozen = net.clipped_grad(x.numpy(), t.numpy(), max_norm=1e6, trainable=[True, True, False, True, True, True])
    ps = net.per_sample_grads(x.numpy(), t.numpy()).flat
    keep = np.ones(net.n_params, bool)
    keep[16:32] = False  # the shared W's entries are not counted in the norms
    np.testing.assert_allclose(frozen.norms, np.linalg.norm(ps[:, keep], axis=1), rtol=1e-12)


def test_ties_reduce_is_expand_transposed():
    rng = np.random.default_rng(0)
    E, b = rng.standard_normal((3, 5)), rng.standard_normal(4)
    ties = Ties([("a", E), ("b", b), ("c", E.T), ("d", b), ("e", E)])
    assert (ties.n_params, ties.n_uses, ties.multi) == (19, 19 + 15 + 4 + 15, frozenset({0, 1}))
    u, p = rng.standard_normal(ties.n_uses), rng.standard_normal(ties.n_params)
    np.testing.assert_allclose(ties.reduce(u) @ p, u @ ties.expand(p), rtol=1e-13)
    dense = np.stack([ties.expand(e) for e in np.eye(ties.n_params)])  # (P, P_use): expand's matrix
    np.testing.assert_allclose(ties.reduce(u), dense @ u, rtol=1e-13)


# ---------------------------------------------------------------------- back to torch, DP-SGD for torch
def test_to_torch_ties_the_torch_parameters_again():
    model = reused_sequential()
    back = jg.Sequential.from_torch(model).to_torch()
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    np.testing.assert_allclose(back(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-12, atol=1e-12)
    assert jg.Sequential.from_torch(back).n_params == 46
    W = np.random.default_rng(0).standard_normal((4, 6))
    with pytest.raises(ValueError, match=r"to_torch: layer 1's W is layer 0's W transposed, which torch holds the other way round"):
        jg.Sequential([L.Dense(W, None, "tanh"), L.Dense(W.T)]).to_torch()


@pytest.mark.parametrize("build", [reused_sequential, tied_unembedding], ids=["reused", "tied-unembedding"])
def test_dp_backward_clips_the_per_sample_gradient_of_a_shared_parameter(build):
    model = build()
    x, y = _data("tokens" if build is tied_unembedding else "dense", torch.float64, B=6)
    r = jg.torch.dp_backward(model, x, y, loss="mse", max_norm=0.05)
    ref = copy.deepcopy(model)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    ps = vmap(grad(lambda p, x, t: ((functional_call(ref, p, (x[None],)) - t[None]) ** 2).mean()),
              in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum((v.reshape(6, -1) ** 2).sum(1) for v in ps.values()))
    assert float(norms.min()) > 0.05  # every sample clipped: the cross terms decide c_i
    c = torch.clamp(0.05 / norms, max=1.0)
    np.testing.assert_allclose(r.norms, norms.numpy(), rtol=1e-10)
    for n, p in model.named_parameters():
        want = (c.reshape((-1,) + (1,) * p.dim()) * ps[n]).sum(0) / 6
        np.testing.assert_allclose(p.grad.numpy(), want.numpy(), rtol=1e-10, atol=1e-14)


def test_pickling_keeps_the_ties_a_transposed_view_included():
    """pickle writes ``E.T`` as an array of its own: the network makes the tie again on loading
    (Dask ships networks to its workers this way)."""
    import pickle

    model = tied_unembedding()
    net = jg.Sequential.from_torch(model)
    back = pickle.loads(pickle.dumps(net))
    assert back.n_params == net.n_params == sum(p.numel() for p in model.parameters())
    assert np.shares_memory(back.layers[2].W, back.layers[0].E)
    x, t = _data("tokens", torch.float64)
    np.testing.assert_array_equal(back.loss_and_grads(x.numpy(), t.numpy())[1].flat,
                                  net.loss_and_grads(x.numpy(), t.numpy())[1].flat)
    back.layers[0].E[0, 0] += 1.0  # one table: the unembedding sees the change
    assert back.layers[2].W[0, 0] == back.layers[0].E[0, 0]


def test_the_gradient_flow_report_shows_a_shared_parameters_gradient_in_each_use():
    """The block rows read each layer's gradient; with ties ``Gradients.flat`` holds a parameter
    once, so the rows are cut from the uses' views (the report ran off the end of ``flat`` before)."""
    model = reused_sequential()
    net = jg.Sequential.from_torch(model)
    x, t = _data("dense", torch.float64)
    r = jg.gradient_flow(net, x.numpy(), t.numpy())
    ((model(x) - t) ** 2).mean().backward()  # torch's gradient of each Linear (module 2 is used twice)
    lins = [model[0], model[2], model[4], model[6]]
    want = [float(torch.sqrt(m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum())) for m in lins]
    np.testing.assert_allclose([b.grad_norm for b in r.blocks], want, rtol=1e-10)
    assert r.blocks[1].grad_norm == r.blocks[2].grad_norm


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_mlp_save_writes_a_shared_parameter_once_and_mlp_load_restores_it(tmp_path, suffix):
    net = jg.MLP.from_torch(reused_sequential())
    net.save(tmp_path / f"mlp{suffix}")
    back = jg.MLP.load(tmp_path / f"mlp{suffix}")
    assert back.n_params == net.n_params == 46 and back.weights[1] is back.weights[2]
    assert back.activations == net.activations
    x = np.random.default_rng(0).standard_normal((3, 3))
    np.testing.assert_array_equal(back(x), net(x))


def test_a_conv2d_used_twice_through_the_module_walk():
    """The general path reads a convolution's leaf through the protocol (its ``fill``) as any other."""
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), conv, nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).double()
    net = jg.Sequential.from_torch(model, in_shape=(2, 4, 4))
    g = torch.Generator().manual_seed(8)
    x, t = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    _check_all(net, model, x, t, torch.float64)
