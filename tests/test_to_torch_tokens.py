"""``Sequential.to_torch`` of token networks (``jacgrad.io.interop.torch_tokens``): the GPTs (sdpa,
explicit softmax, tied unembedding), ViTs and the MLP-Mixer block of the test zoo, imported from
torch, written back to torch and read again. Torch's forward of the converted module against
jacgrad's (float64, 1e-12); torch autograd's gradients against ``loss_and_grads`` (rtol 1e-10);
both importers (``jg.from_torch``, the graph; ``Sequential.from_torch``, the module walk) give the
same network back: the same layers and specs, the same arrays bit for bit, the same ties and P,
the same forward bit for bit. A tied unembedding is one torch Parameter; a layer with no torch
form is named."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="to_torch builds torch modules")
nn = torch.nn

import jacgrad as jg  # noqa: E402
import test_bias_free as bf  # noqa: E402 - tests/ is on sys.path; these import torch
import test_zoo_tokens as zt  # noqa: E402
import test_zoo_vit as zv  # noqa: E402
from test_shared_params import _flat, _layout, tied_unembedding  # noqa: E402
from jacgrad.io.interop import torch_tokens as tt  # noqa: E402
from jacgrad.io.interop.torch_blocks import layers_to_torch  # noqa: E402

L = jg.layers
pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")


def _tokens(B=4, T=6, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, zt.V, (B, T)))


def _images(seed=0):
    return torch.as_tensor(np.random.default_rng(seed).standard_normal((3, 3, 8, 8)))


# name -> (torch model in float64 eval mode, its example input)
ZOO = {
    "gpt-sdpa": (lambda: zt.TinyGPT(), _tokens),
    "gpt-softmax": (lambda: zt.TinyGPT(explicit=True), _tokens),
    "gpt-tied": (lambda: bf.TiedGPT(), _tokens),
    "vit-attention": (lambda: zv.TinyViT(attention=True), _images),
    "vit-mean-permute": (lambda: zv.TinyViT(readout="mean", patch_layout="permute", attention=True), _images),
    "vit-slice": (lambda: zv.TinyViT(readout="slice"), _images),
    "mixer": (lambda: zt.MixerBlock(), lambda: torch.as_tensor(np.random.default_rng(0).standard_normal((3, 6, 4)))),
    "tied-unembedding": (lambda: tied_unembedding(), lambda: _tokens(5, 4) % 9),
}


def _net(name):
    make, data = ZOO[name]
    model = zt._model(make, torch.float64)  # perturbed parameters: no zero biases, no unit gammas
    x = data()
    return jg.from_torch(model, x, copy=True), x


def _same_network(a, b):
    """The same layers (reprs, specs), the same arrays bit for bit in order, the same ties and P."""
    assert repr(a) == repr(b)
    assert [M.spec() for M in a.layers] == [M.spec() for M in b.layers]
    assert a.n_params == b.n_params and a._ties().uses == b._ties().uses
    for p, q in zip(a._ties().params, b._ties().params, strict=True):
        assert p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p, q)


@pytest.mark.parametrize("name", list(ZOO))
def test_torch_computes_the_network_and_its_gradients(name):
    net, x = _net(name)
    model = net.to_torch()
    assert sum(p.numel() for p in model.parameters()) == net.n_params  # torch counts a tied Parameter once
    xn = x.numpy()
    t = np.random.default_rng(2).standard_normal(net(xn).shape)
    xt = x.clone().requires_grad_(x.is_floating_point())
    y = model(xt)
    np.testing.assert_allclose(y.detach().numpy(), net(xn), rtol=1e-12, atol=1e-12)
    loss = ((y - torch.as_tensor(t)) ** 2).mean()
    loss.backward()
    value, g = net.loss_and_grads(xn, t)
    np.testing.assert_allclose(value, loss.item(), rtol=1e-12)
    want = _flat({k: p.grad for k, p in model.named_parameters()}, _layout(net, model))
    assert g.flat.shape == want.shape
    np.testing.assert_allclose(g.flat, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    if x.is_floating_point():
        np.testing.assert_allclose(g.input, xt.grad.numpy(), rtol=1e-10, atol=1e-12 * np.abs(g.input).max())


@pytest.mark.parametrize("name", list(ZOO))
def test_both_importers_read_the_converted_module_back(name):
    net, x = _net(name)
    model = net.to_torch()
    xn = x.numpy()
    graph = jg.from_torch(model, x)  # copy=False: views of the torch parameters
    walk = jg.Sequential.from_torch(model, in_shape=net.in_shape)
    for back in (graph, walk):
        _same_network(net, back)
        assert np.array_equal(back(xn), net(xn))  # the same layers on the same arrays: bit for bit
    assert not jg.explain(model, x, file=False).unsupported


def test_the_gpt_modules_and_its_tied_unembedding():
    net, x = _net("gpt-tied")
    model = net.to_torch()
    assert [type(m).__name__ for m in model] == ["Embedding", "PositionalEmbedding"] + ["Residual"] * 4 + \
        ["LayerNorm", "Linear"]
    emb, head = model[0], model[-1]
    assert head.weight is emb.weight and head.bias is None  # head.weight = wte.weight, as in the torch model
    attn = model[2].inner[1]
    assert type(attn) is tt.SelfAttention and attn.heads == zt.H and attn.causal
    assert model[1].table.shape == (zt.T_MAX, zt.D)  # the whole table: T ≤ T_max tokens read its first rows
    back = jg.from_torch(model, x)
    assert np.shares_memory(back.layers[-1].W, back.layers[0].E) and back.n_params == net.n_params
    # an optimiser step on the tied Parameter moves both uses
    walk = jg.Sequential.from_torch(model, copy=False)
    with torch.no_grad():
        emb.weight.mul_(0.5)
    xn = x.numpy()
    np.testing.assert_allclose(walk(xn), model(x).detach().numpy(), rtol=1e-12, atol=1e-12)


def test_the_vit_modules_keep_the_token_plumbing():
    net, x = _net("vit-attention")
    model = net.to_torch()
    assert [type(m).__name__ for m in model] == ["Conv2d", "ImageToTokens", "ClassToken", "PositionalEmbedding"] + \
        ["Residual"] * 4 + ["LayerNorm", "SelectToken", "Linear"]
    assert model[1].in_shape == (6, 2, 2) and model[2].token.shape == (6,) and model[9].index == 0
    state = model.state_dict()
    assert "2.token" in state and "3.table" in state and "4.inner.1.q.weight" in state


@pytest.mark.parametrize("bias", [(True,) * 4, (False,) * 4, (False, False, False, True), (True, False, True, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_keeps_each_projections_bias_flag_and_the_causal_mask(bias, causal):
    rng = np.random.default_rng(3)
    n = lambda *s: rng.standard_normal(s) / 2  # noqa: E731
    b = [n(6) if f else None for f in bias]
    attn = L.MultiHeadAttention(n(6, 6), n(6, 6), n(6, 6), n(6, 6), 3, *b, causal=causal, bias=bias)
    net = jg.Sequential([L.Dense(n(3, 6), n(6), "tanh"), attn, L.TokenMean(6), L.Dense(n(6, 2))])
    model = net.to_torch()
    m = model[2]
    assert (m.heads, m.causal) == (3, causal) and [lin.bias is not None for lin in (m.q, m.k, m.v, m.out)] == list(bias)
    x = rng.standard_normal((2, 5, 3))
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), net(x), rtol=1e-12, atol=1e-12)
    for back in (jg.from_torch(model, torch.tensor(x)), jg.Sequential.from_torch(model)):
        _same_network(net, back)
        assert back.layers[1].bias == bias and back.layers[1].causal == causal
        assert np.array_equal(back(x), net(x))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_small_token_layers_and_padding_idx_come_back(dtype):
    rng = np.random.default_rng(5)
    n = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    net = jg.Sequential([L.Embedding(n(7, 4), padding_idx=2), L.PositionalEmbedding(n(9, 4)), L.ClassToken(n(4)),
                         L.Dense(n(4, 5), n(5), "gelu"), L.TransposeTokens(6, 5), L.Dense(n(6, 3), None, bias=False),
                         L.TransposeTokens(5, 3), L.SelectToken(-1, 5), L.Dense(n(5, 2))])
    model = net.to_torch()
    assert model[0].padding_idx == 2 and all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    assert [type(m).__name__ for m in model[5:10]] == ["TransposeTokens", "Linear", "TransposeTokens", "SelectToken",
                                                      "Linear"]
    x = rng.integers(0, 7, (3, 5))
    x[0, 1] = 2  # the padding token: its row is read as it is
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(model(torch.tensor(x)).detach().numpy(), net(x), rtol=tol, atol=tol)
    for back in (jg.from_torch(model, torch.tensor(x)), jg.Sequential.from_torch(model)):
        _same_network(net, back)
        assert back.layers[0].padding_idx == 2 and np.array_equal(back(x), net(x))


def test_shared_arrays_stay_one_torch_parameter_and_a_transposed_tie_is_refused():
    rng = np.random.default_rng(6)
    E, Wq = rng.standard_normal((7, 4)), rng.standard_normal((4, 4))
    attn = L.MultiHeadAttention(Wq, rng.standard_normal((4, 4)), rng.standard_normal((4, 4)), Wq, 2)
    # the head first, the embedding after: either order ties Linear.weight (W.T = E) to nn.Embedding.weight
    net = jg.Sequential([L.Embedding(E), attn, attn, L.Dense(E.T, None, bias=False)])
    model = net.to_torch()
    assert model[3].weight is model[0].weight
    assert model[1].q.weight is model[1].out.weight and model[2].k.weight is model[1].k.weight
    assert sum(p.numel() for p in model.parameters()) == net.n_params
    x = rng.integers(0, 7, (2, 5))
    _same_network(net, jg.Sequential.from_torch(model))
    _same_network(net, jg.from_torch(model, torch.tensor(x)))
    head_first = layers_to_torch([L.Dense(E.T, None, bias=False), L.Dense(rng.standard_normal((7, 4))), L.Embedding(E)])
    assert head_first[2].weight is head_first[0].weight
    with pytest.raises(ValueError, match=r"to_torch: layer 1's Wk is layer 0's W transposed, which torch holds the "
                                         r"other way round"):
        layers_to_torch([L.Dense(Wq), L.MultiHeadAttention(Wq, Wq.T, Wq, Wq, 2)])


def test_a_layer_with_no_torch_form_is_named():
    class Custom(L.Activation):  # a kind of the user's own (register_layer): no torch module to become
        kind = "custom"

        def __repr__(self):
            return "Custom()"

    with pytest.raises(TypeError, match=r"to_torch: layer 1\.0: Custom\(\) cannot be converted: to_torch converts "
                                        r"Dense, .*MultiHeadAttention, PositionalEmbedding, ClassToken"):
        jg.Sequential([L.Embedding(np.ones((3, 2))), L.Residual([Custom("tanh", 2)])]).to_torch()
    with pytest.raises(TypeError, match=r"module 0 \(SelfAttention\): its k is Linear\(in_features=4, out_features=2"):
        m = tt.SelfAttention(4, 2)
        m.k = nn.Linear(4, 2)
        jg.Sequential.from_torch(nn.Sequential(m))
