"""ResNet blocks: ``Residual`` around convolutions, with an identity or a projection shortcut
(``p(x) + s·f(x)``), read by ``jg.from_torch`` from a small ResNet written here (torchvision's
BasicBlock: conv3×3-BN-ReLU-conv3×3-BN, + a strided 1×1 conv-BN downsample, → add → ReLU) and
checked against torch itself: forward, every parameter gradient (autograd), per-sample gradient
norms and the NTK (torch.func), at 1e-10 in float64 and 1e-4 in float32; per-sample gradients and
the Gauss–Newton products in float64; files; a hand-built dense block with a projection shortcut;
the refusals (train-mode batch norm, shapes that do not join). torch.export is slow: one import per dtype.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="graph capture imports torch models")
nn = torch.nn

import jacgrad as jg  # noqa: E402
from test_torch_capture import _check_against_torch, _model, _sources, _torch_flat  # noqa: E402
from test_torch_capture_conv import _with_stats  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")
L = jg.layers


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``, spelled as there (one ReLU module used twice, ``out += identity``)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, two BasicBlocks (the second strided, with a 1×1 conv + BN shortcut),
    global average pooling, flatten, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1, self.layer2 = BasicBlock(4, 4), BasicBlock(4, 6, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def _images(dtype, shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


_NETS: dict = {}


def _imported(dtype):
    """``(model, net)``: the small ResNet in ``dtype`` and its import (cached: export is slow)."""
    if dtype not in _NETS:
        model = _with_stats(_model(SmallResNet, getattr(torch, dtype)))
        _NETS[dtype] = model, jg.from_torch(model, torch.as_tensor(_images(dtype, (2, 3, 8, 8))))
    return _NETS[dtype]


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 1e-4)])
def test_a_small_resnet_is_read_into_residual_blocks_and_matches_torch(dtype, rtol):
    model, net = _imported(dtype)
    kinds = [type(M).__name__ for M in net.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "Residual", "Activation", "Residual", "Activation", "AdaptiveAvgPool2d",
                     "Flatten", "Dense"]
    first, second = net.layers[2], net.layers[4]
    assert first.shortcut is None and [M.kind for M in first.branch] == ["conv2d", "batchnorm2d"] * 2
    assert [M.kind for M in second.shortcut] == ["conv2d", "batchnorm2d"] and second.shortcut[0].W.shape == (6, 4, 1, 1)
    assert second.in_shape == (4, 8, 8) and second.out_shape == (6, 4, 4) and net.layers[5].in_shape == (6, 4, 4)
    assert net.dtype == dtype
    _check_against_torch(model, net, _images(dtype, (4, 3, 8, 8), seed=1), rtol)


def test_per_sample_gradients_and_gauss_newton_products_match_torch_func():
    model, net = _imported("float64")
    x = _images("float64", (3, 3, 8, 8), seed=2)
    t = np.random.default_rng(3).standard_normal((3, 3))
    sources = _sources(net, model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        return torch.func.functional_call(model, (p, buffers), (xi[None],))[0]

    X, T = torch.as_tensor(x), torch.as_tensor(t)
    per = torch.func.vmap(torch.func.grad(lambda p, xi, ti: ((f(p, xi) - ti) ** 2).mean()), in_dims=(None, 0, 0))(
        params, X, T)
    want = np.stack([_torch_flat(model, sources, {k: v[i] for k, v in per.items()}) for i in range(3)])
    np.testing.assert_allclose(net.per_sample_grads(x, t).flat, want, rtol=1e-10, atol=1e-12)
    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
    J = np.stack([np.stack([_torch_flat(model, sources, {k: v[i, o] for k, v in jac.items()}) for o in range(3)])
                  for i in range(3)])                                        # (B, n_out, P) in jacgrad's order
    G = np.einsum("iop,ioq->pq", J, J) * (2 / 3) / 3                          # mse over 3 outputs: H_i = 2/3·I
    v = np.random.default_rng(4).standard_normal(net.n_params)
    np.testing.assert_allclose(net.ggn_vp(x, v, t), G @ v, rtol=1e-10, atol=1e-12 * np.abs(G @ v).max())
    np.testing.assert_allclose(net.ggn_diagonal(x, t).flat, np.diag(G), rtol=1e-10, atol=1e-14)
    Jx = torch.func.vmap(torch.func.jacrev(f, argnums=1), in_dims=(None, 0))(params, X).numpy().reshape(3, 3, -1)
    np.testing.assert_allclose(net.jacobian(x), Jx, rtol=1e-10, atol=1e-12)
    clipped = net.clipped_grad(x, t, max_norm=0.1)
    c = np.minimum(1.0, 0.1 / np.linalg.norm(want, axis=1))
    np.testing.assert_allclose(clipped.grads.flat, (want * c[:, None]).sum(0) / 3, rtol=1e-10, atol=1e-14)


def test_compiled_training_and_private_steps_of_the_resnet_give_the_products_numbers():
    """The compiled steps run the blocks through the same protocol: their numbers are those of
    ``loss_and_grads`` and ``clipped_grad`` (checked against torch above)."""
    _, net = _imported("float64")
    x = _images("float64", (3, 3, 8, 8), seed=6)
    t = np.random.default_rng(7).standard_normal((3, 3))
    loss, g = net.compile(3, loss="mse")(x, t)
    want_loss, want = net.loss_and_grads(x, t)
    np.testing.assert_allclose(g.flat, want.flat, rtol=1e-12, atol=1e-15)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
    _, private = net.compile(3, loss="mse", clip=0.1, noise_multiplier=0.0)(x, t)
    ref = net.clipped_grad(x, t, max_norm=0.1)
    np.testing.assert_allclose(private.grads.flat, ref.grads.flat, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(private.norms, ref.norms, rtol=1e-12)


def test_the_gradient_flow_report_has_rows_for_the_shortcut_layers():
    _, net = _imported("float64")
    x = _images("float64", (3, 3, 8, 8), seed=8)
    t = np.random.default_rng(9).standard_normal((3, 3))
    rep = jg.gradient_flow(net, x, t)
    assert len(rep.layers) == 13 and [b.kind for b in rep.blocks].count("residual") == 2   # 2 + 4 + 6 + 1 leaf layers
    assert "[conv2d,batchnorm2d](x)+1·[" in rep.to_text()
    g = net.loss_and_grads(x, t)[1].layers[4]                           # the second block: branch 0-3, shortcut 4-5
    for row, inner in ((10, 4), (11, 5)):
        assert rep.layers[row].grad_norm == pytest.approx(np.linalg.norm(g[inner]["weight"]), rel=1e-10)


def test_a_resnet_with_a_shortcut_saves_and_loads(tmp_path):
    _, net = _imported("float64")
    x = _images("float64", (2, 3, 8, 8), seed=5)
    for suffix in (".npz", ".safetensors"):
        path = tmp_path / f"resnet{suffix}"
        net.save(path)
        back = jg.Sequential.load(path)
        assert repr(back) == repr(net)
        np.testing.assert_array_equal(back(x), net(x))
    assert "shortcut" in net.layers[4].spec() and "shortcut" not in net.layers[2].spec()


def test_explain_names_the_join_and_the_shortcut_layers():
    model, _ = _imported("float64")
    out = jg.explain(model, torch.randn(2, 3, 8, 8, dtype=torch.float64), file=False)
    assert not out.unsupported and not out.problem
    layer_of = {r.node: r.layer for r in out.rows}
    assert layer_of["add__1"] == "layer 4: Residual(scale=1, projection shortcut) (its join)"
    # the downsample runs first in forward, but the longer operand of the join is the branch
    assert layer_of["conv2d_3"].startswith("layer 4.4: Conv2d(4->6, kernel=(1, 1), stride=(2, 2)")
    assert layer_of["conv2d_4"].startswith("layer 4.0: Conv2d(4->6, kernel=(3, 3), stride=(2, 2)")
    assert layer_of["relu__3"] == "layer 5: Activation('relu', (6, 4, 4))"


def test_train_mode_batch_norm_is_refused_with_what_to_do():
    model = SmallResNet().double().train()
    with pytest.raises(TypeError, match=r"batch norm in training mode normalises by the batch's own statistics: "
                                        r"call model\.eval\(\) first"):
        jg.from_torch(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_a_dense_block_with_a_projection_shortcut_matches_torch_func():
    """``p(x) + 0.7·f(x)`` with ``p`` a Dense 3 -> 4 and ``f`` two tanh Dense layers 3 -> 5 -> 4."""
    rng = np.random.default_rng(0)
    W1, b1, W2, b2 = rng.standard_normal((3, 5)) / 2, rng.standard_normal(5), rng.standard_normal((5, 4)) / 2, \
        rng.standard_normal(4)
    P, c, W3, b3 = rng.standard_normal((3, 4)) / 2, rng.standard_normal(4), rng.standard_normal((4, 2)), \
        rng.standard_normal(2)
    block = L.Residual([L.Dense(W1, b1, "tanh"), L.Dense(W2, b2, "tanh")], scale=0.7, shortcut=[L.Dense(P, c)])
    net = jg.Sequential([block, L.Dense(W3, b3)])
    assert block.layers == block.branch + block.shortcut and net.n_params == 20 + 24 + 16 + 10
    x, t = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    sizes = [a.shape for a in (W1, b1, W2, b2, P, c, W3, b3)]

    def f(theta, xi):
        parts, at = [], 0
        for s in sizes:
            n = int(np.prod(s))
            parts.append(theta[at:at + n].reshape(s))
            at += n
        w1, c1, w2, c2, p, pc, w3, c3 = parts
        return (xi @ p + pc + 0.7 * torch.tanh(torch.tanh(xi @ w1 + c1) @ w2 + c2)) @ w3 + c3

    theta = torch.tensor(np.concatenate([a.ravel() for a in (W1, b1, W2, b2, P, c, W3, b3)]))
    X, T = torch.tensor(x), torch.tensor(t)
    np.testing.assert_allclose(net(x), torch.func.vmap(f, in_dims=(None, 0))(theta, X).numpy(), rtol=1e-12)
    g = torch.func.vmap(torch.func.grad(lambda th, xi, ti: ((f(th, xi) - ti) ** 2).mean()), in_dims=(None, 0, 0))(
        theta, X, T).numpy()
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)  # noqa: E731
    close(net.per_sample_grads(x, t).flat, g)
    close(net.per_sample_grad_norms(x, t), np.linalg.norm(g, axis=1))
    close(net.loss_and_grads(x, t)[1].flat, g.mean(0))
    J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(theta, X).numpy()
    close(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J, J))
    G = np.einsum("iop,ioq->pq", J, J) / 6
    v = rng.standard_normal(theta.numel())
    close(net.ggn_vp(x, v, t), G @ v)
    close(net.ggn_diagonal(x, t).flat, np.diag(G))
    close(net.jacobian(x), torch.func.vmap(torch.func.jacrev(f, argnums=1), in_dims=(None, 0))(theta, X).numpy())


def test_shapes_that_do_not_join_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"map 3 -> 4; a residual block without a shortcut needs the same shape"):
        L.Residual([L.Dense(rng.standard_normal((3, 4)))])
    with pytest.raises(ValueError, match=r"inner layers output \(4,\) per sample but the shortcut layers \(5,\)"):
        L.Residual([L.Dense(rng.standard_normal((3, 4)))], shortcut=[L.Dense(rng.standard_normal((3, 5)))])
    block = L.Residual([L.Conv2d(rng.standard_normal((4, 2, 3, 3)), None, stride=2, padding=1)],
                       shortcut=[L.Conv2d(rng.standard_normal((4, 2, 1, 1)), None)])   # stride 1: (4, 6, 6)
    with pytest.raises(ValueError, match=r"inner layers output \(4, 3, 3\) per sample but the shortcut layers "
                                         r"\(4, 6, 6\)"):
        jg.Sequential([block, L.Flatten(), L.Dense(rng.standard_normal((36, 2)))], in_shape=(2, 6, 6))


def _torchvision():
    """torchvision, or a skip: absent, or present but not importable (its PyPI wheel for torch 2.13,
    0.28.0, is the CUDA build: on the CPU build of torch its operators fail to register)."""
    try:
        import torchvision
    except Exception as exc:  # ImportError, or the RuntimeError of a torchvision built for another torch
        pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {str(exc)[:120]}")
    return torchvision


def test_torchvision_resnet18_imports_whole_and_matches_torch():
    """resnet18(weights=None) in eval mode on a 1×3×32×32 input: every node read (jg.explain's table:
    nothing unsupported, every parameter in the network), and the import's forward, every parameter
    gradient and the per-sample gradient norm against torch autograd at float64."""
    tv = _torchvision()
    from jacgrad.models.graph import capture

    torch.manual_seed(0)
    model = _with_stats(tv.models.resnet18(weights=None).double().eval())
    with torch.no_grad():                                  # off their initial values (BN weights: all ones)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    cap = capture(model, x, copy=False)                    # what jg.explain and jg.from_torch both run: one trace
    out = cap.explanation()
    assert not out.unsupported and not out.problem, out.problem
    net = jg.Sequential(cap.layers, in_shape=cap.in_shape)
    assert net.n_params == sum(p.numel() for p in model.parameters())           # 100 % of the parameters
    blocks = [M for M in net.layers if M.kind == "residual"]
    assert len(blocks) == 8 and sum(M.shortcut is not None for M in blocks) == 3
    y = model(x)
    np.testing.assert_allclose(net(x.numpy()), y.detach().numpy(), rtol=1e-10, atol=1e-10)
    t = torch.randn(y.shape, dtype=torch.float64)
    model.zero_grad()
    ((y - t) ** 2).mean().backward()
    want = _torch_flat(model, _sources(net, model), {k: p.grad for k, p in model.named_parameters()})
    np.testing.assert_allclose(net.loss_and_grads(x.numpy(), t.numpy())[1].flat, want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    # B = 1: the sample's own gradient is the batch gradient
    np.testing.assert_allclose(net.per_sample_grad_norms(x.numpy(), t.numpy()), [np.linalg.norm(want)], rtol=1e-10)


def test_a_projection_shortcut_acts_per_token_on_token_batches():
    """``(B, T, 3)``: ``LayerNorm(P x + 0.5·f(x))`` per token, against torch.func."""
    rng = np.random.default_rng(1)
    W1, W2, P, W3 = (rng.standard_normal(s) / 2 for s in ((3, 5), (5, 4), (3, 4), (4, 2)))
    net = jg.Sequential([L.Residual([L.Dense(W1, None, "tanh"), L.Dense(W2, None)], scale=0.5,
                                    shortcut=[L.Dense(P, None)]), L.LayerNorm(np.ones(4)), L.Dense(W3, None)])
    x, t = rng.standard_normal((4, 6, 3)), rng.standard_normal((4, 6, 2))
    assert net.takes_tokens
    sizes = [(3, 5), (5,), (5, 4), (4,), (3, 4), (4,), (4,), (4,), (4, 2), (2,)]

    def f(theta, xi):
        parts, at = [], 0
        for s in sizes:
            n = int(np.prod(s))
            parts.append(theta[at:at + n].reshape(s))
            at += n
        w1, c1, w2, c2, p, pc, gamma, beta, w3, c3 = parts
        h = xi @ p + pc + 0.5 * (torch.tanh(xi @ w1 + c1) @ w2 + c2)
        return torch.nn.functional.layer_norm(h, (4,), gamma, beta) @ w3 + c3

    theta = torch.tensor(np.concatenate([a.ravel() for a in (W1, np.zeros(5), W2, np.zeros(4), P, np.zeros(4),
                                                               np.ones(4), np.zeros(4), W3, np.zeros(2))]))
    X, T = torch.tensor(x), torch.tensor(t)
    np.testing.assert_allclose(net(x), torch.func.vmap(f, in_dims=(None, 0))(theta, X).numpy(), rtol=1e-12, atol=1e-14)
    g = torch.func.vmap(torch.func.grad(lambda th, xi, ti: ((f(th, xi) - ti) ** 2).mean()), in_dims=(None, 0, 0))(
        theta, X, T).numpy()
    for method in ("auto", "gram", "instantiate"):
        np.testing.assert_allclose(net.per_sample_grad_norms(x, t, method=method), np.linalg.norm(g, axis=1),
                                   rtol=1e-10)
    np.testing.assert_allclose(net.per_sample_grads(x, t).flat, g, rtol=1e-10, atol=1e-13)
    J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(theta, X).numpy().reshape(4, 12, -1)
    K = np.einsum("iop,jqp->ijoq", J, J)
    np.testing.assert_allclose(jg.ntk(net, x), K, rtol=1e-10, atol=1e-12 * np.abs(K).max())
    G = np.einsum("iop,ioq->pq", J, J) * (2 / 12) / 4                        # mse over the 12 outputs of a sample
    v = rng.standard_normal(theta.numel())
    np.testing.assert_allclose(net.ggn_vp(x, v, t), G @ v, rtol=1e-10, atol=1e-12 * np.abs(G @ v).max())
    np.testing.assert_allclose(net.ggn_diagonal(x, t).flat, np.diag(G), rtol=1e-10, atol=1e-12 * np.abs(G).max())
