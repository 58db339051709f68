"""A tiny vision transformer through ``jg.from_torch``: patch convolution -> tokens -> class token ->
positional embedding -> pre-norm MLP blocks with residuals -> LayerNorm -> token 0 (or the token
mean) -> head. Its import (``jg.explain``: every node a layer) and every product against the torch
model itself through ``torch.func`` (float64 to 1e-10, float32 to 1e-4).

``TinyViT(attention=True)`` adds a pre-norm self-attention sub-block to each block (a ViT proper);
``tests/test_zoo_tokens.py`` checks it against torch."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
from vit_reference import TOL, check_products, flat_params  # noqa: E402 - it imports torch
pytestmark = pytest.mark.torch
nn = torch.nn


class Block(nn.Module):
    """``x + MLP(LN(x))``, and before it ``x + Attention(LN(x))`` when ``attention``."""

    def __init__(self, d: int, hidden: int, heads: int = 2, attention: bool = False):
        super().__init__()
        self.attention = attention
        if attention:
            self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        if self.attention:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A ViT on ``(B, C, H, H)`` images with ``(H / patch)²`` patch tokens of width ``d``; ``readout``
    ``"token"`` (the class token, ``x[:, 0]``), ``"slice"`` (the same as ``x[:, :1].squeeze(1)``) or
    ``"mean"`` (the mean over the tokens);
    ``patch_layout`` ``"transpose"`` (``flatten(2).transpose(1, 2)``) or ``"permute"``
    (``permute(0, 2, 3, 1).reshape``)."""

    def __init__(self, C=3, H=8, patch=4, d=6, hidden=8, classes=3, depth=2, readout="token",
                 patch_layout="transpose", attention=False):
        super().__init__()
        T = (H // patch) ** 2
        self.patch = nn.Conv2d(C, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, T + 1, d) * 0.5)
        self.blocks = nn.Sequential(*[Block(d, hidden, attention=attention) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.readout, self.patch_layout = readout, patch_layout

    def forward(self, x):
        x = self.patch(x)
        if self.patch_layout == "transpose":
            x = x.flatten(2).transpose(1, 2)
        else:
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        read = {"token": lambda: x[:, 0], "slice": lambda: x[:, :1].squeeze(1), "mean": lambda: x.mean(dim=1)}
        return self.head(read[self.readout]())


def _torch_function(model, net):
    """``f(theta, x_i)``: the torch model at jacgrad's flat parameters ``theta``, one sample. Each
    jacgrad parameter is matched to the torch parameter whose memory it shares (``copy=False``):
    a Dense W is the transpose of torch's weight, the tokens' tables torch's without the leading 1s."""
    named = dict(model.named_parameters())
    layout = []
    for _, L in jg.layers.leaf_layers(net.layers):
        for p in L.params:
            (name,) = [n for n, t in named.items() if np.shares_memory(p, t.detach().numpy())]
            transposed = p.ndim == 2 and not p.flags.c_contiguous
            layout.append((name, p.shape, transposed))

    def f(theta, xi):
        params, at = {}, 0
        for name, shape, transposed in layout:
            k = int(np.prod(shape))
            v = theta[at:at + k].reshape(shape)
            params[name] = (v.T if transposed else v).reshape(named[name].shape)
            at += k
        return torch.func.functional_call(model, params, (xi[None],))[0]
    return f


def _model(dtype, **kw):
    torch.manual_seed(0)
    return TinyViT(**kw).to({np.float64: torch.float64, np.float32: torch.float32}[dtype]).eval()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("readout,layout", [("token", "transpose"), ("mean", "permute"), ("slice", "transpose")])
def test_tiny_vit_imports_and_matches_torch_func(dtype, readout, layout):
    model = _model(dtype, readout=readout, patch_layout=layout)
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((3, 3, 8, 8)).astype(dtype), rng.standard_normal((3, 3)).astype(dtype)
    ex = jg.explain(model, (torch.tensor(x),))
    assert not ex.unsupported
    net = jg.from_torch(model, (torch.tensor(x),))
    kinds = [L.kind for L in net.layers]
    assert kinds == ["conv2d", "image_to_tokens", "class_token", "positional_embedding", "residual", "residual",
                     "layernorm", "token_mean" if readout == "mean" else "select_token", "dense"]
    assert net.n_params == sum(p.numel() for p in model.parameters())
    np.testing.assert_allclose(flat_params(net).size, net.n_params)
    f = _torch_function(model, net)
    check_products(net, f, x, t, TOL[dtype])
    if dtype == np.float64:  # the input-output Jacobian (B, classes, C·H·W) through the token part
        theta = torch.tensor(flat_params(net))
        Jx = torch.func.vmap(torch.func.jacrev(lambda xi: f(theta, xi)))(torch.tensor(x)).reshape(3, 3, -1).numpy()
        np.testing.assert_allclose(net.jacobian(x), Jx, rtol=1e-10, atol=1e-12)
        assert jg.gradient_flow(net, x, t).verdict in ("healthy", "vanishing", "exploding")


def test_tiny_vit_file_round_trip(tmp_path):
    model = _model(np.float64)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    net = jg.from_torch(model, (torch.tensor(x),))
    net.save(tmp_path / "vit.safetensors")
    back = jg.Sequential.load(tmp_path / "vit.safetensors")
    np.testing.assert_array_equal(back(x), net(x))
    np.testing.assert_allclose(back(x), model(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


def test_vit_token_ops_out_of_pattern_are_refused_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.extra = nn.Linear(4, 4), nn.Parameter(torch.randn(1, 2, 4))

        def forward(self, x):  # x: (B, 4) -> tokens by a concatenation of a computed value
            h = self.lin(x)[:, None]
            return torch.cat([self.extra.expand(x.shape[0], -1, -1), h], dim=1).mean(dim=2)

    ex = jg.explain(Odd().double().eval(), (torch.zeros(2, 4, dtype=torch.float64),))
    rows = {r.op: r.layer for r in ex.rows}
    assert "only a class token prepended" in rows["cat"]
    assert "a mean over the axes [2] of a 3-D value" in rows["mean"]  # not over the tokens: the conv reading
    with pytest.raises(TypeError, match="Odd has 3 parts jacgrad cannot import"):
        jg.from_torch(Odd().double().eval(), (torch.zeros(2, 4, dtype=torch.float64),))


def test_timm_vit_tiny_explain_covers_all_but_attention():
    """timm's ``vit_tiny_patch16_224`` (random weights): every node ``jg.explain`` cannot read is inside an
    attention module, so every parameter outside attention is covered. Skips without timm (timm 1.0.31
    imports torchvision at import time; neither is a jacgrad dependency). Not yet run where timm imports."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ex = jg.explain(model, (torch.randn(2, 3, 224, 224),))
    outside = [r for r in ex.rows if not r.supported and ".attn" not in r.module]
    assert not outside, f"unsupported outside attention: {[(r.node, r.op, r.layer) for r in outside]}"
    rows = {r.op: r.layer for r in ex.rows}
    assert "ClassToken" in rows["cat"] and "select" in rows


def test_tiny_vit_compiled_and_private_steps():
    """``net.compile(B)`` of the imported ViT gives the numbers of ``loss_and_grads`` bitwise; the private
    step (clip, no noise) those of ``clipped_grad``."""
    model = _model(np.float64)
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((4, 3, 8, 8)), rng.standard_normal((4, 3))
    net = jg.from_torch(model, (torch.tensor(x),))
    value, g = net.loss_and_grads(x, t)
    step = net.compile(4)
    for _ in range(2):
        v2, g2 = step(x, t)
        assert v2 == value
        np.testing.assert_array_equal(g2.flat, g.flat)
    private = net.compile(4, clip=0.5, noise_multiplier=0.0, input_grad=False)
    np.testing.assert_allclose(private(x, t)[1].flat, net.clipped_grad(x, t, max_norm=0.5).flat, rtol=1e-12, atol=1e-15)
