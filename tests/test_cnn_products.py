"""Every parameter-space product on a small CNN (conv-relu-maxpool-conv(groups)-BatchNorm(eval)-relu-
avgpool-flatten-dense, from torch through ``Sequential.from_torch``) against torch.func on the same
model: per-sample gradients (``vmap(grad)``), their norms (all three methods, per layer), the NTK
(full, trace, x2) and the input Jacobians (``vmap(jacrev)``), the Gauss–Newton product and
diagonal (``Jᵀ H J`` from ``vmap(jacrev)``), the clipped gradient and ``loss_and_grads``;
float64 to 1e-10, float32 to 1e-4. Then Opacus (``GradSampleModule``) and BackPACK
(``BatchL2Grad``, ``DiagGGNExact``) on a CNN without BatchNorm, which they do not all support."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch", reason="the CNN products are checked against torch.func")
nn = torch.nn

TOL = {np.float64: 1e-10, np.float32: 1e-4}
IN = (3, 8, 8)


def _model(dtype, bn=True, seed=0, groups=2):
    torch.manual_seed(seed)
    parts = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1, groups=groups)]
    if bn:
        parts.append(nn.BatchNorm2d(6))
    parts += [nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 5)]
    m = nn.Sequential(*parts).to(torch.float64 if dtype == np.float64 else torch.float32)
    if bn:
        bnm = parts[4]
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            bnm.running_mean.uniform_(-0.5, 0.5)
            bnm.running_var.uniform_(0.5, 2.0)
            bnm.weight.uniform_(0.5, 1.5)
            bnm.bias.uniform_(-0.3, 0.3)
    return m.eval()


def _flat_order(model):
    """The torch parameter names in jacgrad's flat order, and whether each is a Linear weight (transposed)."""
    out = []
    for name, p in model.named_parameters():
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        out.append((name, isinstance(mod, nn.Linear) and name.endswith("weight")))
    return out


def _to_flat(model, grads, lead=1):
    """A dict of torch tensors (``(B, *shape)`` per name with lead=1) as jacgrad's flat ``(B, P)``."""
    parts = []
    for name, transposed in _flat_order(model):
        g = grads[name]
        if transposed:
            g = g.transpose(-1, -2)
        parts.append(g.reshape(*g.shape[:lead], -1) if lead else g.reshape(-1))
    return torch.cat(parts, dim=-1).detach().numpy()


def _close(a, b, dtype):
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()))
    err = float(np.abs(np.asarray(a, np.float64) - b).max())
    assert err <= TOL[dtype] * scale, (err, scale)


def _setup(dtype, B=4, bn=True):
    model = _model(dtype, bn)
    net = jg.Sequential.from_torch(model, in_shape=IN)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B,) + IN).astype(dtype)
    t = rng.standard_normal((B, 5)).astype(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p, xi):  # one sample (C, H, W) -> (5,)
        return torch.func.functional_call(model, (p, buffers), (xi[None],))[0]

    return model, net, x, t, params, f


def _mse(f):
    return lambda p, xi, ti: ((f(p, xi) - ti) ** 2).mean()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_per_sample_grads_and_norms_match_vmap_grad(dtype):
    model, net, x, t, params, f = _setup(dtype)
    X, T = torch.tensor(x), torch.tensor(t)
    g = torch.func.vmap(torch.func.grad(_mse(f)), in_dims=(None, 0, 0))(params, X, T)
    ref = _to_flat(model, g)
    assert net.n_params == ref.shape[1]
    _close(net.per_sample_grads(x, t).flat, ref, dtype)
    for method in ("auto", "gram", "instantiate"):
        _close(net.per_sample_grad_norms(x, t, method=method), np.linalg.norm(ref.astype(np.float64), axis=1), dtype)
    # per layer: one column per top-level layer (the parameterless ones 0)
    per = net.per_sample_grad_norms(x, t, per_layer=True, method="gram")
    sizes = [sum(int(np.prod(p.shape)) for p in L.params) for L in net.layers]
    cols, at = [], 0
    for n in sizes:
        cols.append(np.linalg.norm(ref[:, at:at + n].astype(np.float64), axis=1))
        at += n
    _close(per, np.stack(cols, axis=1), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_loss_and_grads_and_clipped_grad_match_torch(dtype):
    model, net, x, t, params, f = _setup(dtype)
    X, T = torch.tensor(x), torch.tensor(t)
    model.zero_grad()
    loss = ((model(X) - T) ** 2).mean()
    loss.backward()
    value, g = net.loss_and_grads(x, t)
    _close(np.asarray(value), loss.item(), dtype)
    _close(g.flat, _to_flat(model, {k: p.grad for k, p in model.named_parameters()}, lead=0), dtype)
    # the clipped gradient: (Σ_i clip_C(g_i)) / B from the per-sample gradients of torch.func
    per = _to_flat(model, torch.func.vmap(torch.func.grad(_mse(f)), in_dims=(None, 0, 0))(params, X, T)).astype(np.float64)
    n = np.linalg.norm(per, axis=1)
    C = float(np.median(n))
    want = (per * np.minimum(1.0, C / n)[:, None]).mean(axis=0)
    r = net.clipped_grad(x, t, max_norm=C)
    _close(r.grads.flat, want, dtype)
    _close(r.norms, n, dtype)


def _flat_jac(model, J):
    parts = []
    for name, transposed in _flat_order(model):
        g = J[name]  # (N, 5, *shape)
        if transposed:
            g = g.transpose(-1, -2)
        parts.append(g.reshape(g.shape[0], g.shape[1], -1))
    return torch.cat(parts, dim=-1).detach().numpy().astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ntk_and_input_jacobian_match_vmap_jacrev(dtype):
    model, net, x, t, params, f = _setup(dtype, B=5)
    x2 = np.random.default_rng(7).standard_normal((3,) + IN).astype(dtype)
    J1, J2 = _flat_jac(model, torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, torch.tensor(x))), \
        _flat_jac(model, torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, torch.tensor(x2)))
    _close(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J1, J1), dtype)
    _close(jg.ntk(net, x, x2), np.einsum("iop,jqp->ijoq", J1, J2), dtype)
    _close(jg.ntk(net, x, x2, trace=True), np.einsum("iop,jop->ij", J1, J2), dtype)
    _close(net.ntk(x, trace=True), np.einsum("iop,jop->ij", J1, J1), dtype)
    # the input-output Jacobians through the factors (jacobian_chain)
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    g = lambda xi: torch.func.functional_call(model, (params, buffers), (xi[None],))[0]  # noqa: E731
    Jx = torch.func.vmap(torch.func.jacrev(g))(torch.tensor(x)).reshape(5, 5, -1).numpy()
    for order in ("forward", "reverse", "auto"):
        _close(net.jacobian(x, order=order), Jx, dtype)
    y, cache = net.forward(x)
    _close(net.jacobian_chain(cache).jacobian(), Jx, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ggn_vp_and_diagonal_match_jacobians(dtype):
    model, net, x, t, params, f = _setup(dtype)
    J = _flat_jac(model, torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, torch.tensor(x)))
    B = x.shape[0]
    G = np.einsum("iop,ioq->pq", J, J) * (2 / 5) / B  # mse over a sample's 5 outputs: H_i = 2/5 · I
    v = np.random.default_rng(3).standard_normal(net.n_params).astype(dtype)
    _close(net.ggn_vp(x, v, t), G @ v.astype(np.float64), dtype)
    _close(net.ggn_diagonal(x, t).flat, np.diag(G), dtype)
    _close(net.ggn_diagonal(x, t, max_memory=4096).flat, np.diag(G), dtype)  # in chunks of samples


def test_sequential_needs_an_image_shape_and_saves_it(tmp_path):
    model = _model(np.float64)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d.*needs the per-sample input shape: pass in_shape"):
        jg.Sequential.from_torch(model)
    net = jg.Sequential.from_torch(model, in_shape=IN)
    assert net.in_shape == IN and net.n_out == 5
    net.save(tmp_path / "cnn.npz")
    back = jg.Sequential.load(tmp_path / "cnn.npz")
    x = np.random.default_rng(0).standard_normal((2,) + IN)
    np.testing.assert_array_equal(back(x), net(x))
    with pytest.raises(ValueError, match=r"layer 0: Conv2d.*built for inputs \(3, 8, 8\) but is given \(3, 6, 6\)"):
        jg.Sequential(list(net.layers), in_shape=(3, 6, 6))


def _plain(dtype, B=4, groups=2):
    model = _model(dtype, bn=False, groups=groups)
    net = jg.Sequential.from_torch(model, in_shape=IN)
    rng = np.random.default_rng(2)
    return model, net, rng.standard_normal((B,) + IN).astype(dtype), rng.integers(0, 5, B)


def test_norms_match_opacus_grad_sample_module():
    opacus = pytest.importorskip("opacus", reason="Opacus checks the per-sample norms of conv layers")
    model, net, x, y = _plain(np.float64)
    gsm = opacus.GradSampleModule(model.train(), loss_reduction="sum")  # Opacus records activations in train mode (no BatchNorm here)
    loss = nn.functional.cross_entropy(gsm(torch.tensor(x)), torch.tensor(y), reduction="sum")
    loss.backward()
    ref = np.sqrt(sum((p.grad_sample.reshape(len(x), -1) ** 2).sum(1).numpy() for p in model.parameters()))
    _close(net.per_sample_grad_norms(x, y, loss="softmax_cross_entropy"), ref, np.float64)


def _backpack(model, x, y, *extensions):
    import backpack

    model = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss())(model(torch.tensor(x)), torch.tensor(y))
    with backpack.backpack(*extensions):
        loss.backward()
    return model


@pytest.mark.parametrize("groups", [1, 2])
def test_norms_and_ggn_diagonal_match_backpack(groups):
    pytest.importorskip("backpack", reason="BackPACK checks the per-sample norms and the GGN diagonal")
    from backpack.extensions import BatchGrad, BatchL2Grad, DiagGGNExact

    model, net, x, y = _plain(np.float32, groups=groups)  # BackPACK's conv transposes run in float32
    B = len(x)
    model = _backpack(model, x, y, BatchL2Grad(), BatchGrad(), DiagGGNExact())
    # of ℓ_i / B; BackPACK's BatchL2Grad of a grouped conv weight disagrees with its own BatchGrad
    # (it gives about twice the squared norm), so there its BatchGrad is the reference
    sq = sum((p.batch_l2 if groups == 1 else (p.grad_batch.reshape(B, -1) ** 2).sum(1)).numpy()
             for p in model.parameters())
    _close(net.per_sample_grad_norms(x, y, loss="softmax_cross_entropy"), np.sqrt(sq) * B, np.float32)
    diag = {k: p.diag_ggn_exact for k, p in model.named_parameters()}
    _close(net.ggn_diagonal(x, y, loss="softmax_cross_entropy").flat, _to_flat(model, diag, lead=0), np.float32)


def test_gradient_flow_rows_match_torch_per_block():
    """``gradient_flow`` on a CNN: one row per layer; χ = mean_i ‖J_i‖_F²/h_out, ‖J‖₂ (mean over
    samples) and ‖∂L/∂θ‖ against each block's Jacobian by torch.func and torch's gradient."""
    model, net, x, t, params, f = _setup(np.float64)
    r = jg.gradient_flow(net, x, t)
    assert [row.kind for row in r.blocks] == [L.kind for L in net.layers]
    blocks = [model[0:2], model[2:3], model[3:4], model[4:6], model[6:7], model[7:8], model[8:9]]
    X, T = torch.tensor(x), torch.tensor(t)
    model.zero_grad()
    ((model(X) - T) ** 2).mean().backward()
    z = X
    for row, block in zip(r.blocks, blocks):
        J = torch.func.vmap(torch.func.jacrev(lambda zi: block(zi[None])[0]))(z.detach())
        z = block(z).detach()
        J = J.reshape(len(x), z[0].numel(), -1).detach().numpy()
        np.testing.assert_allclose(row.chi, (J ** 2).sum(axis=(1, 2)).mean() / J.shape[1], rtol=1e-10)
        np.testing.assert_allclose(row.jacobian_norm, np.linalg.norm(J, 2, axis=(1, 2)).mean(), rtol=1e-8)
        assert row.jacobian_bound >= row.jacobian_norm * (1 - 1e-12)
        grads = [p.grad.numpy().ravel() for p in block.parameters()]
        np.testing.assert_allclose(row.grad_norm, np.linalg.norm(np.concatenate(grads)) if grads else 0.0,
                                   rtol=1e-10, atol=1e-14)
    # .layers: one row per parameterised layer (conv, conv, BatchNorm, Linear): weight and bias gradient norms
    owners = [model[0], model[3], model[4], model[8]]
    assert len(r.layers) == len(owners)
    for row, mod in zip(r.layers, owners):
        np.testing.assert_allclose(row.grad_norm, float(mod.weight.grad.norm()), rtol=1e-10)
        np.testing.assert_allclose(row.bias_grad_norm, float(mod.bias.grad.norm()), rtol=1e-10)


def test_compiled_step_on_a_cnn_gives_loss_and_grads():
    """``net.compile(B)`` (and its private form) on image batches: the numbers of ``loss_and_grads``
    and ``clipped_grad`` (checked against torch above), bit for bit on NumPy."""
    model, net, x, t, params, f = _setup(np.float64)
    value, g = net.compile(len(x))(x, t)
    want_value, want = net.loss_and_grads(x, t)
    assert float(value) == float(want_value)
    np.testing.assert_array_equal(g.flat, want.flat)
    _, r = net.compile(len(x), clip=0.5)(x, t)
    np.testing.assert_array_equal(r.grads.flat, net.clipped_grad(x, t, max_norm=0.5).grads.flat)
    with pytest.raises(ValueError, match=r"compiled for batch 4 of inputs \(3, 8, 8\): x must be \(4, 3, 8, 8\)"):
        net.compile(len(x))(x[:, :, :4], t)


def test_conv1d_without_bias_and_batchnorm1d_products_match_torch_func():
    """Conv1d (bias=False, stride 2) -> BatchNorm1d on (B, C, L) -> ReLU -> Flatten -> Linear ->
    BatchNorm1d on (B, C): per-sample gradients, the NTK trace and the GGN diagonal."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 4, 3), nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        for bn in (m[1], m[5]):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    m.eval()
    net = jg.Sequential.from_torch(m, in_shape=(2, 9))
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((5, 2, 9)), rng.standard_normal((5, 3))
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    f = lambda p, xi: torch.func.functional_call(m, (p, buffers), (xi[None],))[0]  # noqa: E731
    g = torch.func.vmap(torch.func.grad(_mse(f)), in_dims=(None, 0, 0))(params, torch.tensor(x), torch.tensor(t))
    _close(net.per_sample_grads(x, t).flat, _to_flat(m, g), np.float64)
    J = _flat_jac(m, torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, torch.tensor(x)))
    _close(jg.ntk(net, x, trace=True), np.einsum("iop,jop->ij", J, J), np.float64)
    _close(net.ggn_diagonal(x, t).flat, np.einsum("iop,iop->p", J, J) * (2 / 3) / 5, np.float64)
