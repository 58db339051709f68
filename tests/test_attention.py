"""``jg.layers.MultiHeadAttention`` against torch ``nn.MultiheadAttention(batch_first=True)`` with the
same weights: forward, ∂L/∂x and every parameter gradient (float64 to 1e-10, float32 to 1e-4), the
JVP against ``torch.func.jvp``, the factor's adjoint test, dense form, stacks and spectra, per-sample
gradients against ``torch.func.vmap(grad)``, edge cases (T = 1, B = 1, heads = 1, causal, a query
whose keys are all masked, all-equal scores), bad input, and a pre-norm transformer block end to end."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.tokens.attention_factor import AttentionFactor

torch = pytest.importorskip("torch")


def _tb():
    """The torch mapping of the token layers (jacgrad.io.interop.torch_blocks; torch is imported)."""
    from jacgrad.io.interop import torch_blocks

    return torch_blocks
nn = torch.nn
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]

TOL = {np.float64: 1e-10, np.float32: 1e-4}
TDT = {np.float64: torch.float64, np.float32: torch.float32}


def _torch_mha(d, heads, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(d, heads, bias=bias, batch_first=True, dtype=TDT[dtype])
    if bias:  # torch initialises the biases to 0: make them count
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m


def _ours(m, causal=False):
    """The jacgrad layer built by hand from torch's tensors (independent of from_torch_module)."""
    a = lambda t: t.detach().numpy().copy()
    d = m.embed_dim
    W = a(m.in_proj_weight)
    Ws = [W[i * d:(i + 1) * d].T.copy() for i in range(3)] + [a(m.out_proj.weight).T.copy()]
    bs = {}
    if m.in_proj_bias is not None:
        b = a(m.in_proj_bias)
        bs = dict(bq=b[:d], bk=b[d:2 * d], bv=b[2 * d:], bo=a(m.out_proj.bias))
    return jg.layers.MultiHeadAttention(*Ws, heads=m.num_heads, causal=causal, **bs)


def _torch_forward(m, x, causal, kpm):
    T = x.shape[1]
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
    return m(x, x, x, key_padding_mask=kpm, attn_mask=cm, need_weights=False)[0]


def _torch_grads(m, x):
    """torch's gradients by jacgrad's names, in its layout (W transposed); no biases for bias=False."""
    d = m.embed_dim
    gW = m.in_proj_weight.grad
    out = {}
    for i, n in enumerate("qkv"):
        out[f"W{n}"] = gW[i * d:(i + 1) * d].T
        if m.in_proj_bias is not None:
            out[f"b{n}"] = m.in_proj_bias.grad[i * d:(i + 1) * d]
    out["Wo"] = m.out_proj.weight.grad.T
    if m.out_proj.bias is not None:
        out["bo"] = m.out_proj.bias.grad
    return {k: t.numpy() for k, t in out.items()}


def _compare(L, grads, ref, tol, what=""):
    """Every torch gradient against ours by name (a bias=False torch module: the weights only)."""
    got = dict(zip(L.names, grads))
    assert set(ref) <= set(got) and len(ref) in (4, 8)
    for name, r in ref.items():
        np.testing.assert_allclose(got[name], r, rtol=tol, atol=tol, err_msg=f"{what}{name}")


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


CASES = {  # name: (B, T, d, heads, causal, padding rows, bias)
    "plain": (3, 5, 8, 2, False, None, True),
    "causal": (3, 5, 8, 4, True, None, True),
    "padding": (3, 6, 8, 2, False, {1: [4, 5]}, True),
    "causal+padding": (2, 5, 6, 3, True, {0: [1, 2], 1: [4]}, True),
    "fully masked sample": (3, 4, 8, 2, False, {1: [0, 1, 2, 3]}, True),
    "causal, first key masked": (2, 4, 8, 2, True, {0: [0]}, True),  # query 0 sees no key
    "T=1": (4, 1, 6, 2, False, None, True),
    "T=1 causal": (2, 1, 6, 3, True, None, True),
    "B=1": (1, 7, 8, 2, True, None, True),
    "heads=1": (3, 5, 6, 1, False, None, True),
    "no bias": (3, 5, 8, 2, True, None, False),
}


def _inputs(B, T, d, dtype, pad, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=TDT[dtype])
    gy = torch.randn(B, T, d, generator=g, dtype=TDT[dtype])
    kpm = None
    if pad is not None:
        kpm = torch.zeros(B, T, dtype=torch.bool)
        for b, ts in pad.items():
            kpm[b, ts] = True
    return x, gy, kpm


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_torch(case, dtype):
    B, T, d, heads, causal, pad, bias = CASES[case]
    m = _torch_mha(d, heads, dtype, bias)
    L = _ours(m, causal)
    x, gy, kpm = _inputs(B, T, d, dtype, pad)
    xt = x.clone().requires_grad_(True)
    y = _torch_forward(m, xt, causal, kpm)
    y.backward(gy)
    assert torch.isfinite(y).all()
    tol = TOL[dtype]
    yj, state = L.forward(x.numpy(), key_padding_mask=None if kpm is None else kpm.numpy())
    assert yj.dtype == dtype and yj.shape == (B, T, d)
    np.testing.assert_allclose(yj, y.detach().numpy(), rtol=tol, atol=tol)
    grads = [np.full(p.shape, np.nan, dtype=dtype) for p in L.params]
    gx, deltas = L.backward(state, gy.numpy(), grads)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=tol, atol=tol)
    _compare(L, grads, _torch_grads(m, xt), tol)
    assert len(deltas) == 4 and all(D.shape == (B, T, d) for D in deltas)


def test_a_query_with_every_key_masked_outputs_the_bias_as_torch_autograd_does():
    m = _torch_mha(8, 2, np.float64)
    L = _ours(m)
    x, _, kpm = _inputs(3, 4, 8, np.float64, {1: [0, 1, 2, 3]})
    y, _ = L.forward(x.numpy(), key_padding_mask=kpm.numpy())
    np.testing.assert_array_equal(y[1], np.broadcast_to(m.out_proj.bias.detach().numpy(), (4, 8)))
    assert np.isfinite(y).all()


def test_all_equal_scores_give_uniform_weights_and_match_torch():
    m = _torch_mha(6, 2, np.float64)
    with torch.no_grad():  # q = bq for every token: every score of a query row is equal
        m.in_proj_weight[:6].zero_()
        m.in_proj_bias[6:12].zero_()
        m.in_proj_weight[6:12].zero_()
    L = _ours(m)
    x, gy, _ = _inputs(2, 5, 6, np.float64, None)
    y, state = L.forward(x.numpy())
    np.testing.assert_allclose(state[4], np.full((2, 2, 5, 5), 0.2), rtol=0, atol=1e-15)
    xt = x.clone().requires_grad_(True)
    yt = _torch_forward(m, xt, False, None)
    yt.backward(gy)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
    grads = [np.empty(p.shape) for p in L.params]
    gx, _ = L.backward(state, gy.numpy(), grads)
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=1e-12)
    _compare(L, grads, _torch_grads(m, xt), 1e-12)


@pytest.mark.parametrize("case", ["plain", "causal+padding", "T=1", "fully masked sample"])
def test_jvp_matches_torch_func_jvp(case):
    B, T, d, heads, causal, pad, bias = CASES[case]
    m = _torch_mha(d, heads, np.float64, bias)
    L = _ours(m, causal)
    x, u, kpm = _inputs(B, T, d, np.float64, pad)
    with _math_sdpa():  # forward AD: not implemented for the flash kernel
        _, ref = torch.func.jvp(lambda z: _torch_forward(m, z, causal, kpm), (x,), (u,))
    _, state = L.forward(x.numpy(), key_padding_mask=None if kpm is None else kpm.numpy())
    F = L.factor(state)
    np.testing.assert_allclose(F.jvp(u.numpy()), ref.detach().numpy(), rtol=1e-10, atol=1e-10)
    flat = F.jvp(u.numpy().reshape(B, T * d))  # Chain's layout: (B, T·d)
    np.testing.assert_allclose(flat, ref.detach().numpy().reshape(B, T * d), rtol=1e-10, atol=1e-10)


def _factor(case="causal+padding", dtype=np.float64):
    B, T, d, heads, causal, pad, bias = CASES[case]
    m = _torch_mha(d, heads, dtype, bias)
    L = _ours(m, causal)
    x, _, kpm = _inputs(B, T, d, dtype, pad)
    _, state = L.forward(x.numpy(), key_padding_mask=None if kpm is None else kpm.numpy())
    return L, state, L.factor(state), m, x, kpm


@pytest.mark.parametrize("case", ["plain", "causal+padding", "T=1", "heads=1", "fully masked sample"])
def test_factor_adjoint_dense_and_stacks(case):
    L, state, F, m, x, kpm = _factor(case)
    B, T, d = x.shape
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d))
    lhs = np.einsum("btd,btd->b", v, F.jvp(u))
    rhs = np.einsum("btd,btd->b", F.vjp(v), u)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    # dense against torch's per-sample Jacobian
    def one(z, mask):
        return _torch_forward(m, z[None], L.causal, None if mask is None else mask[None])[0]
    Jt = torch.stack([torch.autograd.functional.jacobian(lambda z: one(z, None if kpm is None else kpm[b]), x[b])
                      .reshape(T * d, T * d) for b in range(B)])
    D = F.dense()
    np.testing.assert_allclose(D, Jt.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(F.dense(transposed=True), D.swapaxes(1, 2), atol=0)
    S = rng.standard_normal((B, 3, T * d))
    np.testing.assert_allclose(F.jvp_stack(S), np.einsum("bij,brj->bri", D, S), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(F.vjp_stack(S), np.einsum("bji,brj->bri", D, S), rtol=1e-10, atol=1e-10)
    shared = rng.standard_normal((2, T * d))  # one stack for every sample
    np.testing.assert_allclose(F.jvp_stack(shared), np.einsum("bij,rj->bri", D, shared), rtol=1e-10, atol=1e-10)
    sub = F.rows([B - 1])
    np.testing.assert_allclose(sub.dense(), D[B - 1:], atol=0)
    sv = np.linalg.svd(D, compute_uv=False)
    np.testing.assert_allclose(F.singular_values(), sv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F.spectral_norm(), sv[:, 0], rtol=1e-9, atol=1e-12)
    assert (F.norm_bound() >= sv[:, 0] * (1 - 1e-12)).all()


def test_factor_split_at_its_parameters_matches_the_layer_backward_and_torch_jvp():
    """``param_vjp_stack`` (the per-leaf Δ of the products' sweeps) on a stack of R cotangent rows
    equals R separate backward passes; ``param_jvp`` with leaf tangents equals torch's JVP in the
    parameters and the input together."""
    B, T, d, heads, causal, pad, bias = CASES["causal+padding"]
    m = _torch_mha(d, heads, np.float64, bias)
    L = _ours(m, causal)
    x, _, kpm = _inputs(B, T, d, np.float64, pad)
    _, state = L.forward(x.numpy(), key_padding_mask=kpm.numpy())
    F = L.factor(state)
    assert (F.n_leaves, F.h_in, F.h_out, F.tokens, F.batch) == (4, d, d, T, B)
    rng = np.random.default_rng(7)
    S = rng.standard_normal((B, 3, T, d))
    Gs, A_in = F.param_vjp_stack(S)
    assert F.param_vjp_stack(S, need_input=False)[1] is None
    for r in range(3):
        gx, deltas = L.backward(state, S[:, r], [np.empty(p.shape) for p in L.params])
        np.testing.assert_allclose(A_in[:, r], gx, rtol=1e-12, atol=1e-12)
        for G, D in zip(Gs, deltas):
            np.testing.assert_allclose(G[:, r], D, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F.vjp_stack(S), A_in, rtol=1e-12, atol=1e-12)
    # forward split: input tangent u and parameter tangents together, against torch.func.jvp
    params = {k: v.detach() for k, v in m.named_parameters()}
    g = torch.Generator().manual_seed(8)
    tang = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    u = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    f = lambda p, z: torch.func.functional_call(m, p, (z, z, z), dict(key_padding_mask=kpm, attn_mask=cm,
                                                                      need_weights=False))[0]
    with _math_sdpa():
        _, ref = torch.func.jvp(f, (params, x), (tang, u))
    dirs = []
    for i in range(3):
        dirs += [tang["in_proj_weight"][i * d:(i + 1) * d].T.numpy(), tang["in_proj_bias"][i * d:(i + 1) * d].numpy()]
    dirs += [tang["out_proj.weight"].T.numpy(), tang["out_proj.bias"].numpy()]
    A = L.param_input(state)
    leaf = lambda i, base: A[i] @ dirs[2 * i] + dirs[2 * i + 1] + (0 if base is None else base)
    np.testing.assert_allclose(F.param_jvp(u.numpy(), leaf), ref.numpy(), rtol=1e-10, atol=1e-10)


def test_large_token_batch_spectral_norm_by_lanczos_matches_svd():
    """T·d = 96 > the direct-eigensolve size: Lanczos runs."""
    B, T, d, heads, causal, pad, bias = 2, 12, 8, 2, True, None, True
    m = _torch_mha(d, heads, np.float64, bias)
    L = _ours(m, causal)
    x, _, _ = _inputs(B, T, d, np.float64, pad)
    _, state = L.forward(x.numpy())
    F = L.factor(state)
    np.testing.assert_allclose(F.spectral_norm(), np.linalg.norm(F.dense(), 2, axis=(1, 2)), rtol=1e-8)


def _per_sample_torch(m, x, y_target, causal, kpm):
    """∇ of ℓ_i = ½‖y_i − t_i‖² for each sample, by torch.func.vmap(grad), in jacgrad's order."""
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xi, ti, mi):
        T = xi.shape[0]
        cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
        yi = torch.func.functional_call(m, p, (xi[None], xi[None], xi[None]),
                                        dict(key_padding_mask=mi[None], attn_mask=cm, need_weights=False))[0][0]
        return 0.5 * ((yi - ti) ** 2).sum()

    B, T, d = x.shape
    mask = kpm if kpm is not None else torch.zeros(B, T, dtype=torch.bool)
    with _math_sdpa():
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, x, y_target, mask)
    out = []
    for i in range(3):
        out.append(g["in_proj_weight"][:, i * d:(i + 1) * d].transpose(1, 2))
        out.append(g["in_proj_bias"][:, i * d:(i + 1) * d])
    out += [g["out_proj.weight"].transpose(1, 2), g["out_proj.bias"]]
    return [t.numpy() for t in out]


@pytest.mark.parametrize("case", ["plain", "causal+padding", "T=1"])
def test_per_sample_gradients_and_norms_match_torch_func(case):
    B, T, d, heads, causal, pad, bias = CASES[case]
    m = _torch_mha(d, heads, np.float64, bias)
    L = _ours(m, causal)
    x, t, kpm = _inputs(B, T, d, np.float64, pad)
    ref = _per_sample_torch(m, x, t, causal, kpm)
    mask = None if kpm is None else kpm.numpy()
    # (a) our own forward/backward run on each sample alone
    for i in range(B):
        y, st = L.forward(x.numpy()[i:i + 1], key_padding_mask=None if mask is None else mask[i:i + 1])
        grads = [np.empty(p.shape) for p in L.params]
        L.backward(st, y - t.numpy()[i:i + 1], grads)
        for name, ours, r in zip(L.names, grads, ref):
            np.testing.assert_allclose(ours, r[i], rtol=1e-10, atol=1e-10, err_msg=f"sample {i} {name}")
    # (b) from one batch pass: the leaves' A_iᵀΔ_i and Σ_t Δ_i,t, and backward's sq
    y, st = L.forward(x.numpy(), key_padding_mask=mask)
    grads = [np.empty(p.shape) for p in L.params]
    sq = np.zeros(B)
    _, deltas = L.backward(st, y - t.numpy(), grads, sq=sq)
    leaf = []
    for A, D in zip(L.param_input(st), deltas):
        leaf += [np.einsum("btp,btq->bpq", A, D), D.sum(axis=1)]
    for name, ours, r in zip(L.names, leaf, ref):
        np.testing.assert_allclose(ours, r, rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(sq, sum((r.reshape(B, -1) ** 2).sum(axis=1) for r in ref), rtol=1e-10)


def test_param_jvp_matches_torch_func_jvp_in_the_parameters():
    B, T, d, heads, causal, pad, bias = CASES["causal+padding"]
    m = _torch_mha(d, heads, np.float64, bias)
    L = _ours(m, causal)
    x, _, kpm = _inputs(B, T, d, np.float64, pad)
    params = {k: v.detach() for k, v in m.named_parameters()}
    g = torch.Generator().manual_seed(5)
    tang = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    f = lambda p: torch.func.functional_call(m, p, (x, x, x), dict(key_padding_mask=kpm, attn_mask=cm,
                                                                   need_weights=False))[0]
    with _math_sdpa():
        _, ref = torch.func.jvp(f, (params,), (tang,))
    dirs = []
    for i in range(3):
        dirs += [tang["in_proj_weight"][i * d:(i + 1) * d].T.numpy(), tang["in_proj_bias"][i * d:(i + 1) * d].numpy()]
    dirs += [tang["out_proj.weight"].T.numpy(), tang["out_proj.bias"].numpy()]
    _, state = L.forward(x.numpy(), key_padding_mask=kpm.numpy())
    np.testing.assert_allclose(L.param_jvp(state, dirs), ref.numpy(), rtol=1e-10, atol=1e-10)


def test_from_torch_module_and_to_torch_round_trip():
    m = _torch_mha(8, 2, np.float64)
    L = _tb().attention_from_torch(m)
    ref = _ours(m)
    for name, a, b in zip(L.names, L.params, ref.params):
        np.testing.assert_array_equal(a, b, err_msg=name)
    back = L.to_torch()
    for (k, a), (_, b) in zip(back.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), k
    shared = _tb().attention_from_torch(m, copy=False)
    with torch.no_grad():
        m.out_proj.weight[0, 0] += 1.0
    assert shared.Wo[0, 0] == m.out_proj.weight[0, 0].item()
    m0 = _torch_mha(8, 2, np.float64, bias=False)
    nobias = _tb().attention_from_torch(m0)
    assert nobias.names == ("Wq", "Wk", "Wv", "Wo") and nobias.bias == (False,) * 4   # torch's: no biases
    assert sum(a.size for a in nobias.params) == sum(p.numel() for p in m0.parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(batch_first=False), "batch_first=False"),
    (dict(batch_first=True, kdim=3), "kdim/vdim"),
    (dict(batch_first=True, add_bias_kv=True), "add_bias_kv"),
    (dict(batch_first=True, dropout=0.1), "dropout=0.1 in train mode"),
])
def test_from_torch_module_refuses_what_it_cannot_compute(kw, match):
    with pytest.raises(ValueError, match=match):
        _tb().attention_from_torch(nn.MultiheadAttention(8, 2, **kw))


def test_bad_input_is_a_clear_error_naming_the_layer():
    rng = np.random.default_rng(0)
    W = lambda *s: rng.standard_normal(s)
    MHA = jg.layers.MultiHeadAttention
    with pytest.raises(ValueError, match="d = 6 is not divisible by heads = 4"):
        MHA(W(6, 6), W(6, 6), W(6, 6), W(6, 6), heads=4)
    with pytest.raises(ValueError, match="Wk is \\(6, 5\\)"):
        MHA(W(6, 6), W(6, 5), W(6, 6), W(6, 6), heads=2)
    with pytest.raises(ValueError, match=r"bo is \(5,\) float64 but Wq is \(6, 6\) float64: needs \(6,\)"):
        MHA(W(6, 6), W(6, 6), W(6, 6), W(6, 6), heads=2, bo=W(5))
    with pytest.raises(ValueError, match="heads must be a positive int"):
        MHA(W(6, 6), W(6, 6), W(6, 6), W(6, 6), heads=0)
    L = MHA(W(6, 6), W(6, 6), W(6, 6), W(6, 6), heads=2)
    with pytest.raises(ValueError, match=r"layer 3 \(MultiHeadAttention\(d=6, heads=2\)\): x has shape \(2, 4, 5\); "
                                         r"needs \(B, T, 6\)"):
        L.forward(W(2, 4, 5), where=3)
    with pytest.raises(ValueError, match="x has shape \\(2, 6\\)"):
        L.forward(W(2, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 3\) but x is \(2, 4, 6\): needs \(2, 4\)"):
        L.forward(W(2, 4, 6), key_padding_mask=np.zeros((2, 3), bool))
    with pytest.raises(TypeError, match="key_padding_mask has dtype float64; needs bool"):
        L.forward(W(2, 4, 6), key_padding_mask=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="x is float32 but the layer is float64"):
        L.forward(W(2, 4, 6).astype(np.float32))
    with pytest.raises(TypeError, match="dtype int64"):
        L.forward(np.ones((2, 4, 6), dtype=np.int64))
    _, st = L.forward(W(2, 4, 6))
    with pytest.raises(ValueError, match="grad_y has shape \\(2, 4, 5\\)"):
        L.backward(st, W(2, 4, 5), [np.empty(p.shape) for p in L.params])
    with pytest.raises(ValueError, match="needs \\(2, 24\\) or \\(2, 4, 6\\)"):
        L.factor(st).jvp(W(2, 23))


# ---------------------------------------------------------------------------- a pre-norm block
class TorchBlock(nn.Module):
    """x + MHA(LN1(x)); then h + W2·gelu(W1·LN2(h))."""

    def __init__(self, d, heads, hidden, dtype):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, dtype=dtype)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, dtype=dtype)
        self.ln2 = nn.LayerNorm(d, dtype=dtype)
        self.fc1 = nn.Linear(d, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d, dtype=dtype)

    def forward(self, x, causal=True):
        T = x.shape[1]
        z = self.ln1(x)
        h = x + self.attn(z, z, z, attn_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None,
                          need_weights=False)[0]
        return h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pre_norm_transformer_block_matches_torch_end_to_end(dtype):
    torch.manual_seed(0)
    B, T, d, heads, hidden = 3, 6, 8, 2, 16
    blk = TorchBlock(d, heads, hidden, TDT[dtype])
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a = lambda t: t.detach().numpy().copy()
    L = jg.layers
    ln1 = L.LayerNorm(a(blk.ln1.weight), a(blk.ln1.bias))
    att = _tb().attention_from_torch(blk.attn)
    att = L.MultiHeadAttention(*att.params[0::2], heads=heads, causal=True, bq=att.bq, bk=att.bk, bv=att.bv,
                               bo=att.bo)
    ln2 = L.LayerNorm(a(blk.ln2.weight), a(blk.ln2.bias))
    fc1 = L.Dense(a(blk.fc1.weight).T.copy(), a(blk.fc1.bias), "gelu")
    fc2 = L.Dense(a(blk.fc2.weight).T.copy(), a(blk.fc2.bias))
    x = torch.randn(B, T, d, dtype=TDT[dtype])
    gy = torch.randn(B, T, d, dtype=TDT[dtype])
    xt = x.clone().requires_grad_(True)
    y = blk(xt)
    y.backward(gy)

    # the per-token layers run on (B·T, d) rows (the token axis of Sequential is another branch's)
    tok = lambda L_, z: L_.forward(z.reshape(B * T, -1))
    z1, s1 = tok(ln1, x.numpy())
    o, sa = att.forward(z1.reshape(B, T, d))
    h = x.numpy() + o
    z2, s2 = tok(ln2, h)
    u, s3 = tok(fc1, z2)
    v, s4 = tok(fc2, u)
    yj = h + v.reshape(B, T, d)
    tol = TOL[dtype]
    np.testing.assert_allclose(yj, y.detach().numpy(), rtol=tol, atol=tol)

    g = {L_: [np.empty(p.shape, dtype) for p in L_.params] for L_ in (ln1, att, ln2, fc1, fc2)}
    g_u, _ = fc2.backward(s4, gy.numpy().reshape(B * T, d), g[fc2])
    g_z2, _ = fc1.backward(s3, g_u, g[fc1])
    g_h, _ = ln2.backward(s2, g_z2, g[ln2])
    g_h = g_h.reshape(B, T, d) + gy.numpy()
    g_z1, _ = att.backward(sa, g_h, g[att])
    g_x, _ = ln1.backward(s1, g_z1.reshape(B * T, d), g[ln1])
    g_x = g_x.reshape(B, T, d) + g_h
    np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(g[fc1][0], a(blk.fc1.weight.grad).T, rtol=tol, atol=tol)
    np.testing.assert_allclose(g[fc2][1], a(blk.fc2.bias.grad), rtol=tol, atol=tol)
    np.testing.assert_allclose(g[ln1][0], a(blk.ln1.weight.grad), rtol=tol, atol=tol)
    np.testing.assert_allclose(g[ln2][1], a(blk.ln2.bias.grad), rtol=tol, atol=tol)
    _compare(att, g[att], _torch_grads(blk.attn, xt), tol)


def test_attention_factor_is_exported_and_rows_refuse_an_int():
    L, state, F, *_ = _factor("plain")
    assert isinstance(F, AttentionFactor)
    with pytest.raises(TypeError, match="give a slice or an index array"):
        F.rows(0)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_per_sample_gradients_match_opacus_dp_multihead_attention():
    """Opacus' GradSampleModule has no rule for nn.MultiheadAttention (its functorch fallback calls the
    module with one input); its DPMultiheadAttention (separate q, k, v Linear layers) is the peer, run
    sequence-first: in Opacus 1.6 its batch_first=True path does not compute torch's attention."""
    opacus = pytest.importorskip("opacus")
    from opacus.layers import DPMultiheadAttention

    B, T, d, heads, causal, pad, bias = CASES["causal+padding"]
    m = _torch_mha(d, heads, np.float64, bias)
    dm = DPMultiheadAttention(d, heads, batch_first=False).double()
    dm.load_state_dict(m.state_dict())  # Opacus maps in_proj_weight onto its q, k, v Linear layers
    x, g, kpm = _inputs(B, T, d, np.float64, pad)
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)

    class Self(nn.Module):
        def __init__(self, att):
            super().__init__()
            self.att = att

        def forward(self, z):  # z: (T, B, d)
            return self.att(z, z, z, key_padding_mask=kpm, attn_mask=cm, need_weights=False)[0]

    gsm = opacus.GradSampleModule(Self(dm), batch_first=False, loss_reduction="sum")
    y = gsm(x.transpose(0, 1)).transpose(0, 1)
    np.testing.assert_allclose(y.detach().numpy(), _torch_forward(m, x, True, kpm).detach().numpy(), atol=1e-12)
    (y * g).sum().backward()       # ℓ_i = ⟨y_i, g_i⟩
    ref = []
    for lin in (dm.qlinear, dm.klinear, dm.vlinear, dm.out_proj):
        ref += [lin.weight.grad_sample.transpose(1, 2).numpy(), lin.bias.grad_sample.numpy()]
    L = _ours(m, causal=True)
    _, st = L.forward(x.numpy(), key_padding_mask=kpm.numpy())
    sq = np.zeros(B)
    _, deltas = L.backward(st, g.numpy(), [np.empty(p.shape) for p in L.params], sq=sq)
    ours = []
    for A, D in zip(L.param_input(st), deltas):
        ours += [np.einsum("btp,btq->bpq", A, D), D.sum(axis=1)]
    for name, a, r in zip(L.names, ours, ref):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(sq, sum((r.reshape(B, -1) ** 2).sum(axis=1) for r in ref), rtol=1e-10)


def test_the_torch_module_walk_maps_embedding_and_attention():
    from jacgrad.io.interop.torch_blocks import layers_from_torch

    torch.manual_seed(0)
    mods = nn.Sequential(nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.LayerNorm(8)).double()
    emb, att, ln = layers_from_torch(mods)
    assert isinstance(emb, jg.layers.Embedding) and isinstance(att, jg.layers.MultiHeadAttention)
    np.testing.assert_array_equal(emb.E, mods[0].weight.detach().numpy())
    for name, a, b in zip(att.names, att.params, _ours(mods[1]).params):
        np.testing.assert_array_equal(a, b, err_msg=name)
    shared = layers_from_torch(mods, copy=False)[1]
    with torch.no_grad():
        mods[1].in_proj_weight[8, 0] += 1.0   # row 8 of in_proj_weight is column 0 of Wk
    assert shared.Wk[0, 0] == mods[1].in_proj_weight[8, 0].item()
    assert layers_from_torch(mods, dtype="float32")[1].dtype == np.float32
    with pytest.raises(TypeError, match=r"module 1 \(MultiheadAttention\): parameter 'in_proj_weight' is torch.float16"):
        layers_from_torch(nn.Sequential(nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True).half()))
    with pytest.raises(ValueError, match=r"module 0 \(MultiheadAttention\): batch_first=False"):
        layers_from_torch(nn.Sequential(nn.MultiheadAttention(8, 2)))


def test_spec_round_trip_builds_the_same_layers():
    """``spec()`` + the arrays by name -> ``from_spec``: what file loading does through the registry."""
    import json

    rng = np.random.default_rng(0)
    W = lambda *s: rng.standard_normal(s)
    L = jg.layers.MultiHeadAttention(W(6, 6), W(6, 6), W(6, 6), W(6, 6), heads=3, causal=True, bq=W(6), bo=W(6))
    spec = json.loads(json.dumps(L.spec()))
    assert spec == {"kind": "multihead_attention", "heads": 3, "causal": True}
    assert set(spec) - {"kind"} == set(L.spec_fields)
    back = type(L).from_spec(spec, dict(zip(L.names, L.params)))
    x = W(2, 4, 6)
    np.testing.assert_array_equal(back.forward(x)[0], L.forward(x)[0])
    assert type(L).file_widths("layer 0", {n: (p.shape, f"0.{n}") for n, p in zip(L.names, L.params)}) == (6, 6)
    with pytest.raises(ValueError, match=r"layer 0 \(multihead_attention\): array '0.bk' has shape \(5,\); needs \(6,\)"):
        type(L).file_widths("layer 0", {"Wq": ((6, 6), "0.Wq"), "bk": ((5,), "0.bk")})
    E = jg.layers.Embedding(W(5, 3), padding_idx=1)
    spec = json.loads(json.dumps(E.spec()))
    back = type(E).from_spec(spec, {"E": E.E})
    assert back.padding_idx == 1 and back.E is E.E
    assert type(E).file_widths("layer 0", {"E": ((5, 3), "0.E")}) == (5, 3)
    with pytest.raises(ValueError, match=r"array '0.E' has shape \(5,\); needs \(V, d\)"):
        type(E).file_widths("layer 0", {"E": ((5,), "0.E")})


def test_forward_and_backward_into_the_callers_buffers_give_the_same_numbers():
    L, state, F, m, x, kpm = _factor("causal+padding")
    B, T, d = x.shape
    g = np.random.default_rng(9).standard_normal((B, T, d))
    fb = [np.full(s, np.nan) for s in L.forward_shapes((B, T))]
    y, st = L.forward(x.numpy(), out=fb, key_padding_mask=kpm.numpy())
    assert y is fb[0]
    y0, st0 = L.forward(x.numpy(), key_padding_mask=kpm.numpy())
    np.testing.assert_array_equal(y, y0)
    bb = [np.full(s, np.nan) for s in L.backward_shapes((B, T))]
    gx, deltas = L.backward(st, g, [np.empty(p.shape) for p in L.params], out=bb)
    gx0, deltas0 = L.backward(st0, g, [np.empty(p.shape) for p in L.params])
    assert gx is bb[3] and all(D is b for D, b in zip(deltas[:3], bb[:3]))
    np.testing.assert_array_equal(gx, gx0)
    for D, D0 in zip(deltas, deltas0):
        np.testing.assert_array_equal(D, D0)
    assert L.backward(st, g, [np.empty(p.shape) for p in L.params], input_grad=False)[0] is None
    with pytest.raises(ValueError, match=r"buffer shapes need the token batch \(B, T\), got 3"):
        L.forward_shapes(3)
