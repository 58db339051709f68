"""``Sequential.to_torch`` of a ResNet block with a projection shortcut (``p(z) + s·f(z)``, a strided
1×1 Conv2d + eval BatchNorm2d) and of the convolutional layers around it: torch's own forward of the
converted module against jacgrad's (float64, 1e-12), torch autograd's gradients against
``loss_and_grads``; both importers read the module back (``Sequential.from_torch``: the same
layers, the same arrays bit for bit, ties kept; ``jg.from_torch``: the same network from the graph);
the identity-shortcut block keeps its state-dict keys; a layer with no torch module is named (token layers have one:
``test_to_torch_tokens.py``).
"""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="to_torch builds torch modules")
nn = torch.nn

import jacgrad as jg  # noqa: E402
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")
L = jg.layers
IN = (3, 8, 8)


def _bn(rng, c, dtype, activation="identity", affine=True):
    w, b = (1 + 0.3 * rng.standard_normal(c), 0.2 * rng.standard_normal(c)) if affine else (None, None)
    cast = (lambda a: None if a is None else a.astype(dtype))  # noqa: E731
    return L.BatchNorm2d(cast(w), cast(b), cast(0.3 * rng.standard_normal(c)), cast(0.5 + rng.random(c)),
                         eps=1e-3, activation=activation)


def _resnet(dtype="float64", scale=1.0, seed=0):
    """Stem conv-BN, a block conv3×3(stride 2)-BN-ReLU-conv3×3-BN with a 1×1 stride-2 conv + BN
    shortcut, ReLU, global pooling, flatten, a Dense head (the block of the brief, in a network)."""
    rng = np.random.default_rng(seed)
    W = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(dtype)  # noqa: E731
    block = L.Residual([L.Conv2d(W(6, 4, 3, 3), None, stride=2, padding=1), _bn(rng, 6, dtype, "relu"),
                        L.Conv2d(W(6, 6, 3, 3), None, padding=1), _bn(rng, 6, dtype)],
                       scale=scale, shortcut=[L.Conv2d(W(6, 4, 1, 1), None, stride=2), _bn(rng, 6, dtype)])
    return jg.Sequential([L.Conv2d(W(4, 3, 3, 3), rng.standard_normal(4).astype(dtype), padding=1),
                          _bn(rng, 4, dtype, "relu"), block, L.Activation("relu"), L.AdaptiveAvgPool2d(1),
                          L.Flatten(), L.Dense(W(6, 5), rng.standard_normal(5).astype(dtype))], in_shape=IN)


def _x(dtype="float64", B=3, seed=1):
    return np.random.default_rng(seed).standard_normal((B,) + IN).astype(dtype)


def _same_network(a, b):
    """The same layers (specs, shapes bound), the same arrays bit for bit, the same ties."""
    assert repr(a) == repr(b)
    assert [M.spec() for M in a.layers] == [M.spec() for M in b.layers]
    assert a.n_params == b.n_params
    params = lambda net: [p for M in net.layers for p in M.params]  # noqa: E731
    for p, q in zip(params(a), params(b), strict=True):
        assert p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p, q)
    stats = lambda net: [s for M in net.layers for s in _stats(M)]  # noqa: E731
    for p, q in zip(stats(a), stats(b), strict=True):
        assert p.dtype == q.dtype and np.array_equal(p, q)


def _stats(M):
    if M.kind == "residual":
        return [s for inner in M.layers for s in _stats(inner)]
    return [M.running_mean, M.running_var] if M.kind.startswith("batchnorm") else []


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_block_becomes_a_residual_module_with_a_shortcut_and_torch_computes_the_network(scale):
    net = _resnet(scale=scale)
    model = net.to_torch()
    block = model[3]
    assert type(block) is Residual and block.scale == scale
    assert [type(m) for m in block.shortcut] == [nn.Conv2d, nn.BatchNorm2d]
    conv, bn = block.shortcut
    assert (conv.kernel_size, conv.stride, conv.bias) == ((1, 1), (2, 2), None) and not bn.training
    assert [type(m) for m in block.inner] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    assert sorted(k.split(".")[0] for k in block.state_dict()) == ["inner"] * 12 + ["shortcut"] * 6
    x = _x()
    y = model(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(net(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_torch_autograd_gives_the_gradients_of_loss_and_grads(scale):
    net = _resnet(scale=scale)
    model = net.to_torch()
    x = _x()
    t = np.random.default_rng(2).standard_normal((len(x), 5))
    xt = torch.tensor(x, requires_grad=True)
    nn.functional.mse_loss(model(xt), torch.tensor(t)).backward()
    value, g = net.loss_and_grads(x, t)
    # model.parameters() walks the modules as jacgrad orders its parameters (a block: branch, then
    # shortcut); a Linear's weight is W transposed
    want = np.concatenate([(p.grad.T if isinstance(m, nn.Linear) and name == "weight" else p.grad).numpy().ravel()
                           for m in model.modules() for name, p in m.named_parameters(recurse=False)])
    assert g.flat.shape == want.shape
    np.testing.assert_allclose(g.flat, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(g.input, xt.grad.numpy(), rtol=1e-10, atol=1e-12 * np.abs(g.input).max())
    np.testing.assert_allclose(g.layers[2][4]["weight"], model[3].shortcut[0].weight.grad.numpy(), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_from_torch_of_to_torch_is_the_same_network(dtype):
    net = _resnet(dtype, scale=0.5)
    model = net.to_torch()
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    back = jg.Sequential.from_torch(model, in_shape=IN)
    _same_network(net, back)
    x = _x(dtype)
    assert np.array_equal(back(x), net(x))  # the same layers on the same arrays: bit for bit
    # to_torch copies (the network's arrays stay its own); from_torch copies unless copy=False
    params = lambda net: [p for M in net.layers for p in M.params]  # noqa: E731
    assert not any(np.shares_memory(p, q.detach().numpy()) for p in params(net) for q in model.parameters())
    assert not any(np.shares_memory(p, q.detach().numpy()) for p in params(back) for q in model.parameters())
    view = jg.Sequential.from_torch(model, copy=False, in_shape=IN)
    with torch.no_grad():
        model[3].shortcut[0].weight.mul_(2)
    assert np.array_equal(view.layers[2].shortcut[0].W, model[3].shortcut[0].weight.detach().numpy())
    assert not np.array_equal(back.layers[2].shortcut[0].W, view.layers[2].shortcut[0].W)


def test_a_parameter_shared_by_the_branch_and_the_shortcut_stays_one_parameter():
    rng = np.random.default_rng(4)
    W, V = rng.standard_normal((4, 4, 3, 3)) / 6, rng.standard_normal((4, 4, 1, 1))
    bn = _bn(rng, 4, "float64")
    net = jg.Sequential([L.Conv2d(W, None, padding=1, activation="tanh"),
                         L.Residual([L.Conv2d(W, None, padding=1), bn], 0.5, shortcut=[L.Conv2d(V, None), bn])],
                        in_shape=(4, 5, 5))
    assert net.n_params == W.size + V.size + 8
    model = net.to_torch()
    assert sum(p.numel() for p in model.parameters()) == net.n_params
    block = model[2]
    assert block.inner[0].weight is model[0].weight and block.shortcut[1].weight is block.inner[1].weight
    assert block.shortcut[1].running_var is block.inner[1].running_var
    back = jg.Sequential.from_torch(model, in_shape=(4, 5, 5))
    _same_network(net, back)
    assert back.layers[1].branch[0].W is back.layers[0].W
    x = np.random.default_rng(5).standard_normal((2, 4, 5, 5))
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_the_graph_importer_reads_the_converted_module_back(scale):
    net = _resnet(scale=scale)
    model = net.to_torch()
    x = _x()
    again = jg.from_torch(model, torch.tensor(x))
    _same_network(net, again)
    np.testing.assert_allclose(again(x), net(x), rtol=1e-12, atol=1e-12)


def test_the_rest_of_the_image_family_converts_and_comes_back():
    rng = np.random.default_rng(6)
    W = lambda *s: rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))  # noqa: E731
    net = jg.Sequential([L.Conv2d(W(4, 3, 3, 3), None, padding="same", dilation=2, activation="gelu"),
                         L.PReLU(0.1 + 0.2 * rng.random(4)), L.MaxPool2d(3, 2, 1, dilation=1),
                         L.Conv2d(W(6, 2, 2, 2), rng.standard_normal(6), stride=(1, 2), groups=2),
                         _bn(rng, 6, "float64", "elu(alpha=0.5)", affine=False), L.AvgPool2d(2, 1),
                         L.Flatten(), L.Dense(W(18, 2))], in_shape=(3, 9, 9))
    model = net.to_torch()
    assert [type(m).__name__ for m in model] == ["Conv2d", "GELU", "PReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ELU",
                                                  "AvgPool2d", "Flatten", "Linear"]
    x = np.random.default_rng(7).standard_normal((2, 3, 9, 9))
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-12, atol=1e-12)
    _same_network(net, jg.Sequential.from_torch(model, in_shape=(3, 9, 9)))

    seq = jg.Sequential([L.Conv1d(W(4, 2, 3), rng.standard_normal(4), stride=2, activation="relu"),
                         L.BatchNorm1d(1 + rng.random(4), rng.standard_normal(4), rng.standard_normal(4), 1 + rng.random(4)),
                         L.Flatten(), L.Dense(W(24, 3))], in_shape=(2, 13))
    model = seq.to_torch()
    assert [type(m).__name__ for m in model] == ["Conv1d", "ReLU", "BatchNorm1d", "Flatten", "Linear"]
    x = np.random.default_rng(8).standard_normal((3, 2, 13))
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), seq(x), rtol=1e-12, atol=1e-12)
    _same_network(seq, jg.Sequential.from_torch(model, in_shape=(2, 13)))


def test_a_flatten_after_a_residual_block_of_images_comes_back():
    """nn.Flatten right after a block (and its ReLU) is a Flatten layer: the block gives images."""
    rng = np.random.default_rng(10)
    W = lambda *s: rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))  # noqa: E731
    block = L.Residual([L.Conv2d(W(3, 2, 3, 3), None, padding=1, activation="relu")], 0.5,
                       shortcut=[L.Conv2d(W(3, 2, 1, 1), None)])
    for tail in ([], [L.Activation("relu")]):
        net = jg.Sequential([L.Conv2d(W(2, 1, 3, 3), None, padding=1), block, *tail, L.Flatten(), L.Dense(W(48, 2))],
                            in_shape=(1, 4, 4))
        model = net.to_torch()
        back = jg.Sequential.from_torch(model, in_shape=(1, 4, 4))
        _same_network(net, back)
        x = rng.standard_normal((2, 1, 4, 4))
        np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), back(x), rtol=1e-12, atol=1e-12)


def test_a_block_without_a_shortcut_keeps_its_state_dict_keys_and_old_modules_load():
    torch.manual_seed(0)
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), 0.5)
    assert list(block.state_dict()) == ["inner.0.weight", "inner.0.bias", "inner.2.weight", "inner.2.bias"]
    assert "shortcut" not in dict(block.named_children()) and repr(block).count("Sequential") == 1
    x = torch.randn(3, 4)
    np.testing.assert_array_equal(block(x).detach().numpy(), (x + 0.5 * block.inner(x)).detach().numpy())
    fresh = Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), 0.5)
    fresh.load_state_dict(block.state_dict(), strict=True)  # a state dict saved before shortcuts loads as it was
    assert torch.equal(fresh(x), block(x))
    buf = io.BytesIO()
    torch.save(block, buf)  # a whole pickled module: its __dict__ has no shortcut, as one pickled before them
    buf.seek(0)
    old = torch.load(buf, weights_only=False)
    assert torch.equal(old(x), block(x))
    net = jg.Sequential([L.Dense(np.eye(4)), L.Residual([L.Dense(np.eye(4) / 2, None, "tanh")], 0.5)])
    assert [k for k in net.to_torch().state_dict()] == ["0.weight", "0.bias", "1.inner.0.weight",
                                                             "1.inner.0.bias"]


def test_a_shortcut_layer_with_no_torch_module_is_named():
    rng = np.random.default_rng(9)
    n = lambda *s: rng.standard_normal(s)  # noqa: E731
    attn = L.MultiHeadAttention(n(4, 4), n(4, 4), n(4, 4), n(4, 4), 2)
    net = jg.Sequential([L.Dense(n(3, 4), None, "tanh"),
                         L.Residual([L.Dense(n(4, 4)), L.LayerNorm(np.ones(4))], shortcut=[L.Dense(n(4, 4)), attn])])
    x = n(2, 5, 3)
    assert net(x).shape == (2, 5, 4)  # a valid jacgrad network on tokens, and a torch one (interop.torch_tokens)
    model = net.to_torch()
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-12, atol=1e-12)
    _same_network(net, jg.Sequential.from_torch(model))

    class Custom(L.Activation):  # a kind of the user's own (register_layer): no torch module to become
        kind = "custom"

        def __repr__(self):
            return "Custom()"

    odd = jg.Sequential([L.Dense(n(3, 4), None, "tanh"),
                         L.Residual([L.Dense(n(4, 4)), L.LayerNorm(np.ones(4))], shortcut=[L.Dense(n(4, 4)),
                                                                                           Custom("tanh", 4)])])
    with pytest.raises(TypeError, match=r"to_torch: layer 1\.3 \(shortcut layer 1\): Custom\(\) "
                                        r"cannot be converted: to_torch converts Dense, .*Conv2d"):
        odd.to_torch()
