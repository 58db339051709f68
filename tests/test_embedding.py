"""``jg.layers.Embedding`` and its leaf algebra (``jacgrad.tokens.embedding_leaf``) against torch
``nn.Embedding`` with the same weight: forward and ∂E (float64 and float32, repeated tokens,
padding_idx), per-sample gradients and norms (both methods) against ``torch.func.vmap(grad)`` and
Opacus' ``GradSampleModule``, the weighted sum, the NTK term against ``torch.func.jacrev``, the GGN
diagonal against the one-hot form, the parameter JVP against ``torch.func.jvp``, and bad tokens."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.tokens.embedding_leaf import (embedding_fill, embedding_ggn_diagonal, embedding_ntk, embedding_param_jvp,
                                    embedding_sq_norms, embedding_weighted_sum)

torch = pytest.importorskip("torch")


def _tb():
    """The torch mapping of the token layers (jacgrad.io.interop.torch_blocks; torch is imported)."""
    from jacgrad.io.interop import torch_blocks

    return torch_blocks
nn = torch.nn
pytestmark = pytest.mark.torch

TOL = {np.float64: 1e-10, np.float32: 1e-4}
TDT = {np.float64: torch.float64, np.float32: torch.float32}
V, d = 9, 4


def _setup(dtype=np.float64, pad=None, B=4, T=6, seed=0):
    torch.manual_seed(seed)
    m = nn.Embedding(V, d, padding_idx=pad, dtype=TDT[dtype])
    tok = torch.randint(0, V, (B, T))
    tok[0, :4] = 3            # a token repeated in one sample
    if pad is not None:
        tok[1, 2:] = pad      # padded positions
    g = torch.randn(B, T, d, dtype=TDT[dtype])
    L = jg.layers.Embedding(m.weight.detach().numpy().copy(), padding_idx=pad)
    return m, L, tok, g


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pad", [None, 5])
def test_forward_and_gradient_match_torch(dtype, pad):
    m, L, tok, g = _setup(dtype, pad)
    y = m(tok)
    (gE,) = torch.autograd.grad(y, [m.weight], g)
    yj, state = L.forward(tok.numpy())
    assert yj.dtype == dtype
    np.testing.assert_array_equal(yj, y.detach().numpy())
    grads = [np.full((V, d), np.nan, dtype=dtype)]
    gin, delta = L.backward(state, g.numpy(), grads)
    assert gin is None and delta is not None
    np.testing.assert_allclose(grads[0], gE.numpy(), rtol=TOL[dtype], atol=TOL[dtype])
    if pad is not None:
        assert (grads[0][pad] == 0).all()


def _per_sample_torch(m, tok, g):
    """∇_E of ℓ_i = ⟨y_i, g_i⟩ for each sample: torch.func.vmap(grad)."""
    w = m.weight.detach()
    f = lambda w_, t, gg: (nn.functional.embedding(t[None], w_, padding_idx=m.padding_idx) * gg[None]).sum()
    return torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(w, tok, g).numpy()


@pytest.mark.parametrize("pad", [None, 5])
def test_per_sample_gradients_and_norms_match_torch_func(pad):
    m, L, tok, g = _setup(np.float64, pad)
    ref = _per_sample_torch(m, tok, g)
    B = tok.shape[0]
    _, state = L.forward(tok.numpy())
    out = np.full((B, V, d), np.nan)
    embedding_fill(state, g.numpy(), out)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    want = (ref.reshape(B, -1) ** 2).sum(axis=1)
    for method in ("gram", "instantiate", "auto"):
        np.testing.assert_allclose(embedding_sq_norms(state, g.numpy(), method), want, rtol=1e-12, err_msg=method)
    sq = np.zeros(B)
    L.backward(state, g.numpy(), [np.empty((V, d))], sq=sq)
    np.testing.assert_allclose(sq, want, rtol=1e-12)
    # our own forward/backward run on each sample alone
    for i in range(B):
        _, st = L.forward(tok.numpy()[i:i + 1])
        gi = [np.empty((V, d))]
        L.backward(st, g.numpy()[i:i + 1], gi)
        np.testing.assert_allclose(gi[0], ref[i], rtol=1e-12, atol=1e-12)
    c = np.linspace(0.5, 2.0, B)
    np.testing.assert_allclose(embedding_weighted_sum(state, g.numpy(), c, np.empty((V, d))),
                               np.einsum("i,ivd->vd", c, ref), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown method 'ghost'; valid: auto, gram, instantiate"):
        embedding_sq_norms(state, g.numpy(), "ghost")


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_per_sample_gradients_match_opacus():
    opacus = pytest.importorskip("opacus")
    m, L, tok, g = _setup(np.float64)
    gsm = opacus.GradSampleModule(m, loss_reduction="sum")
    (gsm(tok) * g).sum().backward()  # loss = Σ_i ⟨y_i, g_i⟩: per-sample gradient ∇ℓ_i, no mean
    ref = m.weight.grad_sample.detach().numpy()
    _, state = L.forward(tok.numpy())
    out = np.empty((tok.shape[0], V, d))
    np.testing.assert_allclose(embedding_fill(state, g.numpy(), out), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(embedding_sq_norms(state, g.numpy()), (ref ** 2).sum(axis=(1, 2)), rtol=1e-12)


@pytest.mark.parametrize("pad", [None, 5])
@pytest.mark.parametrize("trace", [False, True])
def test_ntk_term_matches_torch_func_jacrev(pad, trace):
    """y_i = M · flatten(E[tok_i]) (O outputs): G_i[o, t] = ∂y_io/∂(embedding output)_it = M[o, t]."""
    m, L, tok1, _ = _setup(np.float64, pad, B=3, T=5, seed=1)
    tok2 = torch.randint(0, V, (2, 4))
    tok2[0, :2] = tok1[0, 0]
    O = 3
    g = torch.Generator().manual_seed(2)
    M1 = torch.randn(O, 5, d, generator=g, dtype=torch.float64)
    M2 = torch.randn(O, 4, d, generator=g, dtype=torch.float64)
    w = m.weight.detach()
    f = lambda w_, t, M: torch.einsum("otd,itd->io", M, nn.functional.embedding(t, w_, padding_idx=pad))
    J1 = torch.func.jacrev(f)(w, tok1, M1).reshape(3, O, -1)
    J2 = torch.func.jacrev(f)(w, tok2, M2).reshape(2, O, -1)
    ref = torch.einsum("iop,jep->ioje", J1, J2).numpy()
    _, s1 = L.forward(tok1.numpy())
    _, s2 = L.forward(tok2.numpy())
    G1 = np.broadcast_to(M1.numpy(), (3, O, 5, d))
    G2 = np.broadcast_to(M2.numpy(), (2, O, 4, d))
    K = embedding_ntk(s1, G1, s2, G2, trace=trace)
    want = np.einsum("ioje->ij", ref * np.eye(O)[None, :, None, :]) if trace else ref
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad", [None, 5])
def test_ggn_diagonal_matches_the_one_hot_form(pad):
    m, L, tok, _ = _setup(np.float64, pad)
    B, T = tok.shape
    C = 3
    S = np.random.default_rng(0).standard_normal((B, C, T, d))
    _, state = L.forward(tok.numpy())
    A = nn.functional.one_hot(tok, V).double().numpy()     # (B, T, V)
    if pad is not None:
        A[tok.numpy() == pad] = 0                           # torch: no gradient reaches the padding row
    want = (np.einsum("btv,bctd->bcvd", A, S) ** 2).sum(axis=(0, 1))
    out = np.zeros((V, d))
    np.testing.assert_allclose(embedding_ggn_diagonal(state, S, out), want, rtol=1e-12, atol=1e-12)


def test_param_jvp_matches_torch_func_jvp():
    m, L, tok, _ = _setup(np.float64, 5)
    Ed = torch.randn(V, d, dtype=torch.float64)
    _, ref = torch.func.jvp(lambda w: nn.functional.embedding(tok, w, padding_idx=5), (m.weight.detach(),), (Ed,))
    _, state = L.forward(tok.numpy())
    # torch's forward does not mask the padding row; its gradient (hence the JVP seen by a GGN) does
    ref = ref.numpy() * (tok.numpy() != 5)[..., None]
    np.testing.assert_array_equal(embedding_param_jvp(state, Ed.numpy()), ref)
    np.testing.assert_array_equal(L.param_jvp(state, [Ed.numpy()]), ref)


def test_from_torch_module_and_to_torch_round_trip():
    m = nn.Embedding(V, d, padding_idx=2, dtype=torch.float64)
    L = _tb().embedding_from_torch(m)
    assert L.padding_idx == 2
    np.testing.assert_array_equal(L.E, m.weight.detach().numpy())
    back = L.to_torch()
    assert back.padding_idx == 2 and torch.equal(back.weight, m.weight)
    shared = _tb().embedding_from_torch(m, copy=False)
    with torch.no_grad():
        m.weight[0, 0] += 1
    assert shared.E[0, 0] == m.weight[0, 0].item()
    with pytest.raises(ValueError, match="max_norm=1.0 renormalises"):
        _tb().embedding_from_torch(nn.Embedding(V, d, max_norm=1.0))
    assert _tb().embedding_from_torch(m, dtype=np.float32).E.dtype == np.float32


def test_bad_tokens_are_clear_errors_naming_the_layer():
    L = jg.layers.Embedding(np.ones((V, d)))
    with pytest.raises(TypeError, match=r"layer 0 \(Embedding\(9, 4\)\): tokens have dtype float64; needs integer"):
        L.forward(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="dtype bool"):
        L.forward(np.zeros((2, 3), dtype=bool))
    with pytest.raises(IndexError, match=r"token id 9 at \(sample, position\) \(1, 2\) is out of range: ids must "
                                         r"lie in \[0, 9\)"):
        L.forward(np.array([[0, 1, 2], [3, 4, 9]]))
    with pytest.raises(IndexError, match=r"token id -1 at \(sample, position\) \(0, 0\)"):
        L.forward(np.array([[-1, 1]]))
    with pytest.raises(ValueError, match=r"tokens have shape \(3,\); needs \(B, T\)"):
        L.forward(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"E must be 2-D \(V, d\)"):
        jg.layers.Embedding(np.ones(3))
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        jg.layers.Embedding(np.ones((3, 2)), padding_idx=3)
    _, st = L.forward(np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"grad_y has shape \(1, 2, 3\).*needs \(1, 2, 4\)"):
        L.backward(st, np.ones((1, 2, 3)), [np.empty((V, d))])
    y, _ = L.forward(torch.tensor([[1, 2]]))  # a torch tensor of ids is accepted (DLPack)
    assert y.shape == (1, 2, 4)


def test_embedding_then_attention_matches_torch():
    """Tokens -> nn.Embedding -> nn.MultiheadAttention (causal) against the jacgrad layers: output and ∂E."""
    torch.manual_seed(3)
    emb = nn.Embedding(V, d, dtype=torch.float64)
    att = nn.MultiheadAttention(d, 2, batch_first=True, dtype=torch.float64)
    tok = torch.randint(0, V, (3, 5))
    z = emb(tok)
    T = tok.shape[1]
    y = att(z, z, z, attn_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1), need_weights=False)[0]
    gy = torch.randn_like(y)
    y.backward(gy)
    E = _tb().embedding_from_torch(emb)
    A = _tb().attention_from_torch(att)
    A = jg.layers.MultiHeadAttention(*A.params[0::2], heads=2, causal=True, bq=A.bq, bk=A.bk, bv=A.bv, bo=A.bo)
    zj, se = E.forward(tok.numpy())
    yj, sa = A.forward(zj)
    np.testing.assert_allclose(yj, y.detach().numpy(), rtol=1e-12, atol=1e-12)
    gz, _ = A.backward(sa, gy.numpy(), [np.empty(p.shape) for p in A.params])
    gE = [np.empty((V, d))]
    E.backward(se, gz, gE)
    np.testing.assert_allclose(gE[0], emb.weight.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_leaf_and_factor_give_the_products_their_pieces():
    """``EmbeddingLeaf`` (the leaf interface of ``param_leaves``) runs the functions tested above;
    ``EmbeddingFactor``: width 0 on the token side, its split hands the rows on as the leaf's G."""
    from jacgrad.tokens.embedding_leaf import EmbeddingFactor, EmbeddingLeaf

    m, L, tok, g = _setup(np.float64, 5)
    B, T = tok.shape
    _, state = L.forward(tok.numpy())
    (leaf,) = L.param_leaves()
    assert isinstance(leaf, EmbeddingLeaf) and leaf.n_arrays == 1 and L.param_input(state) is state
    ref = _per_sample_torch(m, tok, g)
    for method in ("auto", "gram", "instantiate"):
        np.testing.assert_allclose(leaf.sq_norms(state, g.numpy(), method=method), (ref ** 2).sum(axis=(1, 2)),
                                   rtol=1e-12)
    assert (leaf.sq_norms(state, g.numpy(), counted=[False]) == 0).all()
    views = [np.empty((B, V, d))]
    leaf.fill(views, state, g.numpy())
    np.testing.assert_allclose(views[0], ref, atol=1e-12)
    c = np.linspace(1, 2, B)
    out = [np.empty((V, d))]
    leaf.clipped_sum(out, state, g.numpy(), c)
    np.testing.assert_allclose(out[0], np.einsum("i,ivd->vd", c, ref), atol=1e-12)
    G = g.numpy()[:, None]
    K = np.zeros((B, 1, B, 1))
    leaf.ntk_add((state, G), (state, G), False, K)
    np.testing.assert_allclose(K[:, 0, :, 0], ref.reshape(B, -1) @ ref.reshape(B, -1).T, rtol=1e-12, atol=1e-12)
    D = [np.ones((V, d))]
    leaf.ggn_diag_add(D, state, G, 0.5)
    np.testing.assert_allclose(D[0], 1 + 0.5 * (ref ** 2).sum(axis=0), rtol=1e-12)
    Ed = np.random.default_rng(0).standard_normal((V, d))
    np.testing.assert_array_equal(leaf.jvp(state, [Ed], None), embedding_param_jvp(state, Ed))
    F = L.factor(state)
    assert isinstance(F, EmbeddingFactor) and (F.h_in, F.h_out, F.batch, F.tokens, F.n_leaves) == (0, d, B, T, 1)
    S = np.random.default_rng(1).standard_normal((B, 2, T, d))
    Gs, A_in = F.param_vjp_stack(S)
    assert Gs[0] is S and A_in.shape == (B, 2, T, 0)
    assert F.param_vjp_stack(S, need_input=False)[1] is None
    np.testing.assert_array_equal(F.param_jvp(None, lambda i, base: leaf.jvp(state, [Ed], base)),
                                  embedding_param_jvp(state, Ed))
    assert F.dense().shape == (B, T * d, 0) and F.rows([0]).batch == 1
