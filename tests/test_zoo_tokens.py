"""jg.from_torch on token models, read from the traced graph and checked against torch itself:
the forward, every parameter gradient (autograd), per-sample gradient norms and the NTK
(torch.func), at 1e-10 in float64 and 1e-4 in float32. The models are written here (no downloads):
a tiny GPT (token and learned positional embeddings, pre-norm blocks with causal self-attention
written as nanoGPT does —
a fused qkv Linear split into heads — through F.scaled_dot_product_attention and through the
explicit softmax with a causal mask, GELU MLPs, a final LayerNorm, an untied head), and
nn.MultiheadAttention inside a custom module. Attention variants jacgrad does not read are
listed, all of them, in one error and by jg.explain."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="graph capture imports torch models")
nn, F = torch.nn, torch.nn.functional

import jacgrad as jg  # noqa: E402
from jacgrad.nn.layers import named_params  # noqa: E402
import torch_func_reference as tref  # noqa: E402 - tests/ is on sys.path

V, D, H, T_MAX = 11, 8, 2, 16


# ---------------------------------------------------------------------------- the zoo
class CausalSelfAttention(nn.Module):
    """nanoGPT's: one Linear(d, 3d), split, heads by view/transpose, sdpa or the explicit form."""

    def __init__(self, explicit: bool, scale=None, dropout=0.0, mask="causal"):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.explicit, self.scale, self.dropout, self.mask_kind = explicit, scale, dropout, mask
        self.register_buffer("mask", torch.tril(torch.ones(T_MAX, T_MAX)).view(1, 1, T_MAX, T_MAX))
        pos = torch.arange(T_MAX, dtype=torch.float32)
        self.register_buffer("alibi", -0.5 * (pos[None, :] - pos[:, None]).abs().view(1, 1, T_MAX, T_MAX))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in (q, k, v))
        if self.explicit:
            att = (q @ k.transpose(-2, -1)) * (self.scale or 1.0 / math.sqrt(k.size(-1)))
            if self.mask_kind == "causal":
                att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            elif self.mask_kind == "alibi":  # a linear bias by distance, as ALiBi's
                att = att + self.alibi[:, :, :T, :T]
            y = F.dropout(F.softmax(att, dim=-1), self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               dropout_p=self.dropout)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, explicit: bool, **attn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = CausalSelfAttention(explicit, **attn)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Vocabulary 11, width 8, learned positions, 2 pre-norm blocks, a final LayerNorm, an untied head with a
    bias (test_bias_free.TiedGPT: the bias-free head tied to the token embedding)."""

    def __init__(self, explicit: bool = False, blocks=None):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T_MAX, D)
        self.blocks = nn.ModuleList(blocks if blocks is not None else [Block(explicit) for _ in range(2)])
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # GPT's learned positions
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class WithMHA(nn.Module):
    """nn.MultiheadAttention(batch_first=True) inside a custom module, as a residual branch."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln = nn.Linear(3, D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.out = nn.Linear(D, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        a = self.ln(h)
        y, _ = self.attn(a, a, a, need_weights=False)
        return self.out(h + y)


class TimmAttention(nn.Module):
    """timm's spellings: qkv reshaped to (B, T, 3, h, d_h), permuted and unbound; or chunked; or three
    separate Linears; the scale on q; ``.softmax`` on the product."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        if how == "separate":
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        else:
            self.qkv = nn.Linear(D, 3 * D)
        self.proj, self.scale = nn.Linear(D, D), (D // H) ** -0.5

    def forward(self, x):
        B, N, C = x.shape
        if self.how == "unbind":
            q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            parts = self.qkv(x).chunk(3, dim=-1) if self.how == "chunk" else (self.q(x), self.k(x), self.v(x))
            q, k, v = (a.reshape(B, N, H, C // H).transpose(1, 2) for a in parts)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention called with its defaults (need_weights=True: the averaged weights are
    computed and dropped), or with a causal mask."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        if not self.causal:
            return self.attn(x, x, x)[0]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


class MixerBlock(nn.Module):
    """An MLP-Mixer block on (B, T, d): LN, transpose, token-mixing MLP, transpose back, residual; then
    a channel MLP residual."""

    def __init__(self, T=6, d=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok1, self.tok2 = nn.Linear(T, 8), nn.Linear(8, T)
        self.ch1, self.ch2 = nn.Linear(d, 8), nn.Linear(8, d)

    def forward(self, x):
        y = self.ln1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.ln2(x))))


class Wrapped(nn.Module):
    """An attention module as the residual branch between two Linears."""

    def __init__(self, attn):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(3, D), attn, nn.Linear(D, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.attn(h))


# ---------------------------------------------------------------------------- the references
def _sources(net, model):
    """For each jacgrad parameter (flat order): ``(torch name, transposed, columns, shape)`` holding the same
    numbers, found by value (a fused qkv weight: a block of its rows; leading 1s dropped), or None for an array of zeros
    jacgrad adds (a bias torch does not have)."""
    out = []
    for where, a in named_params(net.layers):
        a = np.asarray(a)
        if not a.any():
            out.append(None)
            continue
        hits = []
        for k, p in model.named_parameters():
            p = p.detach().numpy()
            while p.ndim > a.ndim and p.shape[0] == 1:  # a (1, T, d) table is jacgrad's (T, d)
                p = p[0]
            for t in (False, True)[:p.ndim]:
                q = p.T if t else p
                w = a.shape[-1]
                if q.shape[:-1] != a.shape[:-1] or q.shape[-1] % w:
                    continue
                hits += [(k, t, (lo, lo + w), p.shape) for lo in range(0, q.shape[-1], w)
                         if np.array_equal(q[..., lo:lo + w], a)]
        assert len(hits) == 1, f"{where}: {hits}"
        out.append(hits[0])
    return out


def _pick(sources, tensors, n):
    """jacgrad's flat order from torch tensors ``{name: (n, *shape)}``; zeros for the added ones."""
    parts = []
    for (src, size) in sources:
        if src is None:
            continue
        k, t, (lo, hi), shape = src
        g = tensors[k].reshape((n,) + tuple(shape))
        g = g.transpose(-1, -2) if t else g
        parts.append(g[..., lo:hi].reshape(n, -1))
    return torch.cat(parts, dim=1).numpy()


def _check_against_torch(model, net, x, rtol):
    xt = torch.as_tensor(x)
    sources = list(zip(_sources(net, model), [a.size for _, a in named_params(net.layers)]))
    used = {s[0] for s, _ in sources if s is not None}
    assert used == {k for k, _ in model.named_parameters()}
    added = [s is None for s, _ in sources]
    y = model(xt)
    np.testing.assert_allclose(net(x), y.detach().numpy(), rtol=rtol, atol=rtol)

    dtype = y.detach().numpy().dtype
    t = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    model.zero_grad()
    ((y - torch.as_tensor(t)) ** 2).mean().backward()
    _, g = net.loss_and_grads(x, t)
    want = _pick(sources, {k: p.grad for k, p in model.named_parameters()}, 1)[0]
    sizes = [size for _, size in sources]
    keep = np.concatenate([np.full(s, not a) for s, a in zip(sizes, added)])
    got = np.asarray(g.flat)[keep]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    assert not any(added), "every parameter is torch's: the per-sample norms and the NTK are compared whole"

    per = tref.per_sample_grads(model, xt, torch.as_tensor(t))
    norms = tref.grad_norms(per, len(x))
    np.testing.assert_allclose(net.per_sample_grad_norms(x, t), norms, rtol=rtol, atol=rtol * norms.max())
    flat = _pick(sources, dict(per), len(x))
    np.testing.assert_allclose(net.per_sample_grads(x, t).flat, flat, rtol=rtol, atol=rtol * np.abs(flat).max())

    K = tref.ntk(model, xt, int(np.prod(y.shape[1:])))
    np.testing.assert_allclose(jg.ntk(net, x), K, rtol=rtol, atol=rtol * np.abs(K).max())


_model = tref.perturbed  # _model(make, dtype, seed=0)


DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-4)]


# ---------------------------------------------------------------------------- the zoo passes
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "softmax"])
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_tiny_gpt_matches_torch(explicit, dtype, rtol):
    model = _model(lambda: TinyGPT(explicit), dtype)
    tokens = np.random.default_rng(0).integers(0, V, (4, 6))
    net = jg.from_torch(model, torch.as_tensor(tokens))
    kinds = [L.kind for L in net.layers]
    assert kinds == ["embedding", "positional_embedding", "residual", "residual", "residual", "residual", "layernorm",
                     "dense"]
    attn = net.layers[2].layers[1]
    assert type(attn).__name__ == "MultiHeadAttention" and attn.heads == H and attn.causal
    assert net.dtype == np.dtype(str(dtype).removeprefix("torch."))
    _check_against_torch(model, net, tokens, rtol)


def test_fused_qkv_weights_are_views_of_the_torch_parameter():
    model = _model(TinyGPT, torch.float64)
    net = jg.from_torch(model, torch.zeros(2, 5, dtype=torch.long))
    attn, qkv = net.layers[2].layers[1], model.blocks[0].attn.qkv
    for i, W in enumerate((attn.Wq, attn.Wk, attn.Wv)):
        assert np.shares_memory(W, qkv.weight.detach().numpy())
        np.testing.assert_array_equal(W, qkv.weight.detach().numpy()[i * D:(i + 1) * D].T)
    with torch.no_grad():
        qkv.weight.mul_(0.5)  # an optimiser's in-place step is seen
    x = np.random.default_rng(3).integers(0, V, (2, 5))
    np.testing.assert_allclose(net(x), model(torch.as_tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_nn_multihead_attention_in_a_custom_module_matches_torch(dtype, rtol):
    model = _model(WithMHA, dtype)
    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(str(dtype).removeprefix("torch."))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert repr(net).startswith("Sequential([Dense(3->8, tanh), Residual([LayerNorm(8, eps=1e-05), "
                                "MultiHeadAttention(d=8, heads=2)], scale=1), Dense(8->2, identity)]")
    _check_against_torch(model, net, x, rtol)
    out = jg.explain(model, torch.as_tensor(x), file=False)
    assert not out.unsupported
    assert {r.layer for r in out.rows if r.module.startswith("attn")} == {"layer 1.1: MultiHeadAttention(d=8, heads=2)"}


@pytest.mark.parametrize("make, causal", [(lambda: TimmAttention("unbind"), False),
                                          (lambda: TimmAttention("chunk"), False),
                                          (lambda: TimmAttention("separate"), False),
                                          (lambda: TorchMHA(False), False), (lambda: TorchMHA(True), True)],
                         ids=["timm-unbind", "chunk", "separate-qkv", "mha-need-weights", "mha-causal-mask"])
def test_attention_spellings_are_one_multihead_attention(make, causal):
    model = _model(lambda: Wrapped(make()), torch.float64)
    x = np.random.default_rng(0).standard_normal((3, 5, 3))
    net = jg.from_torch(model, torch.as_tensor(x))
    attn = net.layers[1].layers[0]
    assert type(attn).__name__ == "MultiHeadAttention" and attn.heads == H and attn.causal == causal
    _check_against_torch(model, net, x, 1e-10)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_mlp_mixer_block_matches_torch(dtype, rtol):
    model = _model(MixerBlock, dtype)
    x = np.random.default_rng(0).standard_normal((3, 6, 4)).astype(str(dtype).removeprefix("torch."))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert repr(net).startswith("Sequential([Residual([LayerNorm(4, eps=1e-05), TransposeTokens(6, 4), Dense(6->8, "
                                "gelu), Dense(8->6, identity), TransposeTokens(4, 6)], scale=1), Residual([")
    _check_against_torch(model, net, x, rtol)
    if dtype == torch.float64:  # the input Jacobian per sample (T·d, T·d), and the compiled step
        Jx = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(torch.as_tensor(x)).reshape(3, 24, 24)
        np.testing.assert_allclose(net.jacobian(x), Jx.detach().numpy(), rtol=1e-10, atol=1e-12)
        t = np.random.default_rng(2).standard_normal(x.shape)
        value, g = net.loss_and_grads(x, t)
        v2, g2 = net.compile(3, loss="mse", tokens=6)(x, t)
        assert v2 == value
        np.testing.assert_array_equal(g2.flat, g.flat)


def test_transpose_tokens_layer_is_a_permutation_and_saves(tmp_path):
    L = jg.layers
    rng = np.random.default_rng(4)
    net = jg.Sequential([L.Dense(rng.standard_normal((3, 4)), rng.standard_normal(4), "tanh"), L.TransposeTokens(5, 4),
                         L.Dense(rng.standard_normal((5, 2)), None, "identity")])
    x = rng.standard_normal((2, 5, 3))
    want = np.swapaxes(np.tanh(x @ net.layers[0].W + net.layers[0].b), 1, 2) @ net.layers[2].W + net.layers[2].b
    np.testing.assert_allclose(net(x), want, rtol=1e-13)  # (B, d, 2): the last Dense acts along the tokens
    P = net.layers[1].factor(np.zeros((2, 5, 4))).dense()
    np.testing.assert_array_equal(P @ np.arange(20.0), np.arange(20.0).reshape(5, 4).T.ravel())
    net.save(tmp_path / "net.npz")
    back = jg.Sequential.load(tmp_path / "net.npz")
    assert repr(back.layers[1]) == "TransposeTokens(5, 4)"
    np.testing.assert_allclose(back(x), want, rtol=1e-13)
    with pytest.raises(ValueError, match=r"TransposeTokens\(5, 4\)\): input of shape \(2, 4, 5\), needs \(B, 5, 4\)"):
        L.TransposeTokens(5, 4).forward(np.zeros((2, 4, 5)))


def test_tiny_vit_with_attention_matches_torch():
    from test_zoo_vit import TinyViT  # patch conv, class token, positions (the ViT helper's zoo)

    model = _model(lambda: TinyViT(attention=True), torch.float64)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers[4].layers] == ["LayerNorm", "MultiHeadAttention"]
    _check_against_torch(model, net, x, 1e-10)


# ---------------------------------------------------------------------------- refusals
def test_attention_variants_are_all_listed_in_one_error_and_by_explain():
    blocks = [Block(False, scale=0.3), Block(True, mask="alibi"), Block(False, dropout=0.1), Block(True, dropout=0.1)]
    model = TinyGPT(blocks=blocks).double().eval()
    model.blocks[3].train()  # F.dropout of the weights in training mode
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError) as info:
        jg.from_torch(model, x)
    msg = str(info.value)
    assert msg.startswith("TinyGPT has 4 parts jacgrad cannot import:")
    assert "node scaled_dot_product_attention (aten.scaled_dot_product_attention" in msg
    assert "scaled by 0.3, not 1/√d_h = 0.5: a custom scale" in msg
    assert "node softmax (aten.softmax" in msg and "a bias (ALiBi, relative positions)" in msg
    assert "dropout_p=0.1 (attention dropout)" in msg
    assert "node softmax_1 (aten.softmax" in msg and "attention dropout in training mode" in msg
    out = jg.explain(model, x, file=False)
    assert [r.node for r in out.unsupported] == ["scaled_dot_product_attention", "softmax",
                                                 "scaled_dot_product_attention_1", "softmax_1"]


def test_a_rotary_like_transform_of_q_is_refused_naming_the_node():
    class Rotary(CausalSelfAttention):
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            q = q * torch.cos(torch.arange(C, dtype=x.dtype))  # a position-dependent factor
            q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))

    block = Block(False)
    block.attn = Rotary(False)
    with pytest.raises(TypeError, match=r"q is computed by mul \(aten.mul\), not by a projection"):
        jg.from_torch(TinyGPT(blocks=[block]).double().eval(), torch.zeros(2, 5, dtype=torch.long))
