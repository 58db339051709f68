"""Layers without a bias (or without affine parameters) are imported without one: torch's
``nn.Linear(bias=False)`` is ``Dense(W, bias=False)``, ``nn.LayerNorm(elementwise_affine=False)`` a
LayerNorm without parameters, ``nn.MultiheadAttention(bias=False)`` an attention without biases, and
P equals torch's ``sum(p.numel() for p in model.parameters())``. No phantom zero bias enters the
parameter-space products.

Every number is checked against torch.func on the torch model itself (float64 to 1e-10, float32 to
1e-4) by ``test_shared_params._check_all``: the loss, every gradient, per-sample gradients and
their norms, the clipped gradient, the NTK and ``ggn_vp`` / ``ggn_diagonal`` against the dense
Gauss–Newton matrix. The tiny GPT is ``test_zoo_tokens.TinyGPT`` with its head made bias-free and
tied to the token embedding (``head.weight = wte.weight``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the references are torch.func")
from torch import nn  # noqa: E402

import jacgrad as jg  # noqa: E402
from jacgrad.models.checkpoints import network_from_torch  # noqa: E402
from test_shared_params import _check_all  # noqa: E402 - tests/ is on sys.path
from test_zoo_tokens import D, H, T_MAX, V, TinyGPT  # noqa: E402

L = jg.layers
DTYPES = [torch.float64, torch.float32]
IDS = ["f64", "f32"]


def _n_torch(model) -> int:
    return sum(p.numel() for p in model.parameters())


class BareMLP(nn.Module):
    """Linear(3, 5, bias=False) -> tanh -> Linear(5, 4) -> gelu -> Linear(4, 2, bias=False)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5, bias=False), nn.Linear(5, 4), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.c(nn.functional.gelu(self.b(torch.tanh(self.a(x)))))


def bare_sequential(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 4), nn.GELU(),
                         nn.Linear(4, 2, bias=False)).to(dtype)


def _data(dtype, B=5, n_in=3, n_out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n_in, generator=g, dtype=dtype), torch.randn(B, n_out, generator=g, dtype=dtype)


# ---------------------------------------------------------------------- Dense(W, bias=False)
def test_a_bias_free_dense_has_no_bias_parameter():
    W = np.arange(6.0).reshape(3, 2) / 7
    layer = L.Dense(W, None, "tanh", bias=False)
    assert layer.names == ("W",) and len(layer.params) == 1 and layer.b is None and not layer.has_bias
    assert "bias=False" in repr(layer)
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_allclose(layer.forward(x)[0], np.tanh(x @ W), rtol=1e-15)
    net = jg.Sequential([layer, L.Dense(np.ones((2, 1)))])
    assert net.n_params == 6 + 2 + 1
    # Dense(W, None) keeps a zero bias parameter, as before
    assert L.Dense(W, None).names == ("W", "b") and L.Dense(W).b.shape == (2,)


def test_bias_false_with_an_array_and_a_non_bool_are_refused():
    with pytest.raises(ValueError, match="bias=False takes no b"):
        L.Dense(np.ones((3, 2)), np.zeros(2), bias=False)
    with pytest.raises(TypeError, match="bias must be True or False"):
        L.Dense(np.ones((3, 2)), bias=0)


@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_bias_free_mlp_through_the_graph(copy_, dtype):
    torch.manual_seed(1)
    model = BareMLP().to(dtype)
    x, t = _data(dtype)
    net = jg.from_torch(model, x, copy=copy_)
    assert [L_.has_bias for L_ in net.layers] == [False, True, False]
    assert net.n_params == _n_torch(model) == 15 + 24 + 8
    _check_all(net, model, x, t, dtype)


@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_bias_free_mlp_by_the_module_walk(copy_, dtype):
    model = bare_sequential(dtype)
    x, t = _data(dtype)
    net = jg.Sequential.from_torch(model, copy=copy_)
    assert [L_.has_bias for L_ in net.layers] == [False, True, False]
    _check_all(net, model, x, t, dtype)


def test_mlp_from_torch_refuses_a_bias_free_linear_and_names_the_sequential_reader():
    with pytest.raises(TypeError, match=r"bias=False.*jg.Sequential.from_torch"):
        jg.MLP.from_torch(bare_sequential(torch.float64))
    with pytest.raises(TypeError, match="bias-free Dense"):
        jg.MLP._of_layers([L.Dense(np.ones((3, 2)), bias=False)])
    # jg.load's reader (an MLP where it can be, else a Sequential) keeps the layers bias-free
    net = network_from_torch(bare_sequential(torch.float64))
    assert type(net) is jg.Sequential and [L_.has_bias for L_ in net.layers] == [False, True, False]


def test_the_phantom_bias_is_gone_from_the_per_sample_norms():
    """The brief's reproduction: Linear(4, 5, bias=False) -> tanh -> Linear(5, 3), per-sample norms
    against torch.func (per-sample loss: mean over the outputs, as jacgrad's mse)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    x, t = _data(torch.float64, B=6, n_in=4, n_out=3)
    net = jg.from_torch(model, x)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def l_i(p, xi, ti):
        return ((torch.func.functional_call(model, p, (xi[None],)) - ti[None]) ** 2).mean()

    g = torch.func.vmap(torch.func.grad(l_i), in_dims=(None, 0, 0))(params, x, t)
    want = torch.sqrt(sum((v.reshape(6, -1) ** 2).sum(1) for v in g.values())).numpy()
    np.testing.assert_allclose(jg.per_sample_grad_norms(net, x.numpy(), t.numpy()), want, rtol=1e-12)


def test_to_torch_gives_bias_free_linears_and_reads_back_the_same():
    model = bare_sequential(torch.float64)
    net = jg.Sequential.from_torch(model)
    back = net.to_torch()
    assert [m.bias is None for m in back if isinstance(m, nn.Linear)] == [True, False, True]
    assert _n_torch(back) == net.n_params
    x = torch.randn(4, 3, dtype=torch.float64)
    np.testing.assert_allclose(back(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-14)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_file_round_trips_a_bias_free_dense(tmp_path, suffix):
    net = jg.Sequential.from_torch(bare_sequential(torch.float64))
    path = tmp_path / f"net{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    assert [L_.has_bias for L_ in back.layers] == [False, True, False] and back.n_params == net.n_params
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_array_equal(back(x), net(x))


def test_an_old_file_without_the_bias_field_still_loads_with_a_bias(tmp_path):
    """A Dense with a bias writes the spec it always wrote (no "bias" field): files from before
    and after are the same, and load with a bias."""
    rng = np.random.default_rng(0)
    net = jg.Sequential([L.Dense(rng.standard_normal((3, 4)), rng.standard_normal(4), "tanh"), L.LayerNorm(np.ones(4))])
    assert net.layers[0].spec() == {"kind": "dense", "activation": "tanh"}
    path = tmp_path / "old.npz"
    net.save(path)
    back = jg.Sequential.load(path)
    assert back.layers[0].has_bias and back.n_params == net.n_params
    x = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(back(x), net(x))


@pytest.mark.parametrize("make", [bare_sequential, lambda dt: norm_model("ln_plain", dt)], ids=["dense", "norm"])
def test_a_compiled_step_on_a_bias_free_net_is_the_plain_step(make):
    net = jg.Sequential.from_torch(make(torch.float64))
    x, t = (a.numpy() for a in _data(torch.float64))
    loss, g = net.loss_and_grads(x, t)
    step = net.compile(len(x))
    loss_c, g_c = step(x, t, copy=True)
    assert float(loss_c) == float(loss)
    np.testing.assert_array_equal(g_c.flat, g.flat)
    assert g.flat.size == net.n_params and set(g.layers[-1]) == {"W"}
    for product in ("grad_norms", "ggn_diagonal"):
        got = net.compile(len(x), product=product)(x, t) if product == "grad_norms" else \
            net.compile(len(x), product=product)(x)
        want = net.per_sample_grad_norms(x, t) if product == "grad_norms" else net.ggn_diagonal(x)
        np.testing.assert_allclose(getattr(got, "flat", got), getattr(want, "flat", want), rtol=1e-12, atol=1e-14)


def test_the_gradient_flow_report_has_a_row_per_parameterised_layer():
    model = nn.Sequential(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.LayerNorm(5, elementwise_affine=False),
                          nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 2, bias=False)).double()
    net = jg.Sequential.from_torch(model)
    x, t = (a.numpy() for a in _data(torch.float64))
    model.zero_grad()
    ((model(torch.as_tensor(x)) - torch.as_tensor(t)) ** 2).mean().backward()
    r = jg.gradient_flow(net, x, t)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(r.layers) == 3  # the norm has no parameters: no row
    for row, m in zip(r.layers, linears):
        assert row.grad_norm == pytest.approx(float(m.weight.grad.norm()), rel=1e-10)
        assert (row.bias_grad_norm is None) == (m.bias is None)
    assert r.to_json() and r.to_text()


# ---------------------------------------------------------------------- norms without affine parameters
def norm_model(kind: str, dtype=torch.float64):
    """Linear -> tanh -> a norm without (some of) its affine parameters -> Linear(bias=False)."""
    torch.manual_seed(3)
    norm = {"ln_plain": lambda: nn.LayerNorm(5, elementwise_affine=False),
            "ln_no_bias": lambda: nn.LayerNorm(5, bias=False),
            "rms_plain": lambda: nn.RMSNorm(5, eps=1e-6, elementwise_affine=False)}[kind]()
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), norm, nn.Linear(5, 2, bias=False)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


NORM_KINDS = ["ln_plain", "ln_no_bias", "rms_plain"]


@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("importer", ["graph", "walk"])
@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_a_norm_without_affine_parameters_has_none(kind, importer, copy_, dtype):
    model = norm_model(kind, dtype)
    x, t = _data(dtype)
    net = jg.from_torch(model, x, copy=copy_) if importer == "graph" else jg.Sequential.from_torch(model, copy=copy_)
    norm = net.layers[1]
    assert norm.names == (() if kind.endswith("plain") else ("gamma",)) and norm.affine == (kind == "ln_no_bias")
    assert net.n_params == _n_torch(model)
    _check_all(net, model, x, t, dtype)


@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_files_and_to_torch_keep_a_norm_without_affine_parameters(kind, suffix, tmp_path):
    model = norm_model(kind)
    net = jg.Sequential.from_torch(model)
    path = tmp_path / f"net{suffix}"
    net.save(path)
    back = jg.Sequential.load(path)
    assert [L_.names for L_ in back.layers] == [L_.names for L_ in net.layers] and back.n_params == net.n_params
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_array_equal(back(x), net(x))
    module = back.to_torch()
    assert _n_torch(module) == _n_torch(model)
    np.testing.assert_allclose(module(torch.as_tensor(x)).detach().numpy(), model(torch.as_tensor(x)).detach().numpy(),
                               rtol=1e-13, atol=1e-13)


def test_a_norm_without_affine_refuses_a_beta():
    with pytest.raises(ValueError, match="affine=False has no beta"):
        L.LayerNorm(np.ones(3), np.zeros(3), affine=False)
    with pytest.raises(ValueError, match="bias=False takes no beta"):
        L.LayerNorm(np.ones(3), np.zeros(3), bias=False)


# ---------------------------------------------------------------------- attention without biases
class MHAResidual(nn.Module):
    """Linear -> tanh -> x + nn.MultiheadAttention(bias=False)(x) -> Linear, on (B, T, 3) tokens."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(3, D), nn.Linear(D, 2, bias=False)
        self.attn, self.causal = nn.MultiheadAttention(D, H, bias=False, batch_first=True), causal

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
            return self.out(h + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0])
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


class MixedBiasAttention(nn.Module):
    """Separate q, k, v Linears with biases and a bias-free out projection (Qwen's spelling)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, H, C // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MixedResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(3, D), MixedBiasAttention(), nn.Linear(D, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + self.attn(h))


def _tokens(dtype, B=4, T=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, generator=g, dtype=dtype), torch.randn(B, T, 2, generator=g, dtype=dtype)


@pytest.mark.parametrize("copy_", [True, False], ids=["copy", "view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_multihead_attention_without_bias_through_the_graph(copy_, dtype):
    torch.manual_seed(4)
    model = MHAResidual(causal=True).to(dtype).eval()
    x, t = _tokens(dtype)
    net = jg.from_torch(model, x, copy=copy_)
    attn = net.layers[1].layers[0]
    assert attn.names == ("Wq", "Wk", "Wv", "Wo") and attn.bias == (False,) * 4 and attn.causal
    assert net.n_params == _n_torch(model)
    _check_all(net, model, x, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_attention_with_biases_on_some_projections_only(dtype):
    torch.manual_seed(5)
    model = MixedResidual().to(dtype).eval()
    x, t = _tokens(dtype)
    net = jg.from_torch(model, x)
    attn = net.layers[1].layers[0]
    assert attn.bias == (True, True, True, False) and attn.names == ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo")
    assert net.n_params == _n_torch(model)
    _check_all(net, model, x, t, dtype)


def test_bias_free_attention_by_the_module_walk_files_and_to_torch(tmp_path):
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(D, H, bias=False, batch_first=True).double()
    layer = jg.Sequential.from_torch(nn.Sequential(nn.Linear(3, D).double(), mha)).layers[1]
    assert layer.names == ("Wq", "Wk", "Wv", "Wo") and "bias=False" in repr(layer)
    back = layer.to_torch()
    assert back.in_proj_bias is None and _n_torch(back) == _n_torch(mha)
    rng = np.random.default_rng(0)
    mixed = L.MultiHeadAttention(*(rng.standard_normal((D, D)) for _ in range(4)), H, rng.standard_normal(D),
                                 bias=(True, False, False, False))
    with pytest.raises(ValueError, match="some projections only"):
        mixed.to_torch()
    with pytest.raises(ValueError, match="bk given but bias="):
        L.MultiHeadAttention(*(np.eye(D),) * 4, H, bk=np.zeros(D), bias=(True, False, True, True))
    for att in (layer, mixed):
        net = jg.Sequential([L.Dense(rng.standard_normal((3, D))), att])
        for suffix in (".npz", ".safetensors"):
            path = tmp_path / f"att{suffix}"
            net.save(path)
            got = jg.Sequential.load(path)
            assert got.layers[1].bias == att.bias and got.n_params == net.n_params
            x = rng.standard_normal((2, 4, 3))
            np.testing.assert_array_equal(got(x), net(x))


# ---------------------------------------------------------------------- the tied GPT
class CausalAttention(nn.Module):
    """Causal self-attention with separate q, k, v Linears (GPT-NeoX/Llama's spelling), the explicit
    softmax with a causal mask (torch.func's vmap has no batching rule for CPU sdpa: 10x slower)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))
        self.register_buffer("mask", torch.tril(torch.ones(T_MAX, T_MAX)).view(1, 1, T_MAX, T_MAX))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, H, C // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // H))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        y = nn.functional.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TiedGPT(TinyGPT):
    """``test_zoo_tokens.TinyGPT`` (vocabulary 11, width 8, 2 heads, learned positions, 2 pre-norm
    blocks of causal attention and a GELU MLP, a final LayerNorm) with a bias-free head tied to the
    token embedding: ``head = nn.Linear(d, vocab, bias=False)``, ``head.weight = wte.weight``."""

    def __init__(self):
        super().__init__()
        for block in self.blocks:
            block.attn = CausalAttention()
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_the_tied_gpt_matches_torch_and_counts_torchs_parameters(dtype):
    torch.manual_seed(0)
    model = TiedGPT().to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (4, 6), generator=g)
    t = torch.randn(4, 6, V, generator=g, dtype=dtype)
    net = jg.from_torch(model, x)
    head = net.layers[-1]
    assert head.kind == "dense" and not head.has_bias and np.shares_memory(head.W, net.layers[0].params[0])
    assert net.layers[2].layers[1].heads == H
    assert net.n_params == _n_torch(model)
    _check_all(net, model, x, t, dtype)


def test_every_zoo_model_counts_torchs_parameters():
    """P is torch's ``sum(p.numel() for p in model.parameters())`` for the zoo of test_zoo_tokens,
    test_zoo_vit and this file (a tied parameter once)."""
    import test_zoo_tokens as zt
    import test_zoo_vit as zv

    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, V, (2, 5)))
    seq = torch.randn(2, 5, 3, dtype=torch.float64)
    cases = [(zt.TinyGPT(), tokens), (zt.TinyGPT(explicit=True), tokens), (TiedGPT(), tokens),
             (zt.WithMHA(), seq), (zt.Wrapped(zt.TorchMHA(causal=True)), seq), (MHAResidual(), seq),
             (MixedResidual(), seq), (zt.MixerBlock(T=5, d=3), seq), (BareMLP(), torch.randn(2, 3, dtype=torch.float64)),
             (zv.TinyViT(), torch.randn(2, 3, 8, 8, dtype=torch.float64))]
    for model, x in cases:
        model = model.double().eval()
        net = jg.from_torch(model, (x,))
        assert net.n_params == _n_torch(model), type(model).__name__
