"""Every parameter-space product on a small transformer — Embedding → pre-norm block (LayerNorm →
causal MultiHeadAttention, residual; LayerNorm → Dense-GELU-Dense, residual) → Dense head — fed
integer token ids, against ``torch.func`` on the same torch modules: float64 to 1e-10, float32 to
1e-4. The network is built twice: by hand from ``jg.layers`` (causal attention) and by
``Sequential.from_torch`` of the matching ``nn.Sequential`` (torch keeps masks out of the module,
so that one is not causal). ``gradient_flow`` reports on token batches (its numbers: tests/test_token_flow.py);
``compile`` needs ``tokens=T`` for them (``test_compiled_tokens``)."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")


def _tb():
    """The torch mapping of the token layers (jacgrad.io.interop.torch_blocks; torch is imported)."""
    from jacgrad.io.interop import torch_blocks

    return torch_blocks
pytestmark = pytest.mark.torch

V, d, H, F, O, B, T = 11, 8, 2, 16, 3, 3, 5


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)  # vmap of jacrev/grad: the math kernel


def _model():
    from jacgrad.io.interop.torch_blocks import Residual

    nn = torch.nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(V, d),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, H, batch_first=True))),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, F), nn.GELU(), nn.Linear(F, d))),
                      nn.Linear(d, O)).double()
    with torch.no_grad():  # biases and norm parameters away from their 0/1 defaults
        for name, p in m.named_parameters():
            if "bias" in name or ".0.weight" in name and "inner" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


# jacgrad's flat order, each as (torch name, rows of a packed in_proj or None, transposed)
_FLAT = [("0.weight", None, False), ("1.inner.0.weight", None, False), ("1.inner.0.bias", None, False)]
for _i in range(3):
    _rows = slice(_i * d, (_i + 1) * d)
    _FLAT += [("1.inner.1.in_proj_weight", _rows, True), ("1.inner.1.in_proj_bias", _rows, False)]
_FLAT += [("1.inner.1.out_proj.weight", None, True), ("1.inner.1.out_proj.bias", None, False),
          ("2.inner.0.weight", None, False), ("2.inner.0.bias", None, False), ("2.inner.1.weight", None, True),
          ("2.inner.1.bias", None, False), ("2.inner.3.weight", None, True), ("2.inner.3.bias", None, False),
          ("3.weight", None, True), ("3.bias", None, False)]


def _flat(J, lead: int) -> np.ndarray:
    """torch's per-parameter arrays ``(*lead dims, *torch shape)`` in jacgrad's flat order and layout."""
    parts = []
    for name, rows, transposed in _FLAT:
        a = J[name]
        if rows is not None:
            a = a[(slice(None),) * lead + (rows,)]
        if transposed:
            a = a.transpose(-1, -2)
        parts.append(a.reshape(*a.shape[:lead], -1))
    return torch.cat(parts, -1).numpy()


def _reference(m, causal: bool):
    """``f(params, tok): (T,) -> (T, O)``, one sample through the torch modules."""
    call = torch.func.functional_call
    emb, (ln1, mha), (ln2, l1, act, l2), head = m[0], m[1].inner, m[2].inner, m[3]
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None

    def f(p, tok):
        sub = lambda pre: {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}  # noqa: E731
        z = call(emb, sub("0."), (tok[None],))
        u = call(ln1, sub("1.inner.0."), (z,))
        z = z + call(mha, sub("1.inner.1."), (u, u, u), dict(attn_mask=cm, need_weights=False))[0]
        u = act(call(l1, sub("2.inner.1."), (call(ln2, sub("2.inner.0."), (z,)),)))
        z = z + call(l2, sub("2.inner.3."), (u,))
        return call(head, sub("3."), (z,))[0]

    return f


@pytest.fixture(scope="module", params=["by hand, causal", "from_torch"])
def case(request):
    m = _model()
    causal = request.param != "from_torch"
    if causal:
        L = jg.layers
        mha = m[1].inner[1]
        net = jg.Sequential([L.Embedding(m[0].weight.detach().numpy().copy()),
                             L.Residual([L.LayerNorm(m[1].inner[0].weight.detach().numpy().copy(),
                                                     m[1].inner[0].bias.detach().numpy().copy()),
                                         _tb().attention_from_torch(mha, causal=True)]),
                             jg.Sequential.from_torch(m[2:]).layers[0],
                             jg.Sequential.from_torch(m[3:]).layers[0]])
    else:
        net = jg.Sequential.from_torch(m)
        assert not net.layers[1].layers[1].causal
    params = {k: v.detach() for k, v in m.named_parameters()}
    rng = np.random.default_rng(1)
    tok = rng.integers(0, V, (B, T))
    tok[0, 1] = tok[0, 3]  # a repeated token: its embedding row gets both positions' gradients
    t = rng.standard_normal((B, T, O))
    f = _reference(m, causal)
    with _math_sdpa():
        loss = lambda p, ti, yi: ((f(p, ti) - yi) ** 2).mean()  # noqa: E731  jacgrad's mse: mean per sample
        per = _flat(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, torch.from_numpy(tok),
                                                                             torch.from_numpy(t)), 1)
        J = _flat(torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, torch.from_numpy(tok)), 3)
    return net, tok, t, per, J.reshape(B, T * O, -1)


def _cast(net):
    """The float32 copy of ``net``, layer by layer through the layers' own ``from_spec``."""
    L = jg.layers

    def cast(layer):
        if isinstance(layer, L.Residual):
            return L.Residual([cast(i) for i in layer.layers], layer.scale)
        spec = {k: v for k, v in layer.spec().items() if k != "kind"}
        return type(layer).from_spec(spec, {n: p.astype(np.float32) for n, p in zip(layer.names, layer.params)})

    return jg.Sequential([cast(layer) for layer in net.layers])


@pytest.fixture(scope="module", params=["float64", "float32"])
def prec(request, case):
    net = case[0]
    if request.param == "float64":
        return net, 1e-10, 1e-12
    return _cast(net), 1e-4, 1e-6


def test_loss_and_grads(case, prec):
    _, tok, t, per, _ = case
    net, rtol, atol = prec
    loss, g = net.loss_and_grads(tok, t.astype(net.dtype))
    assert g.flat.dtype == net.dtype
    np.testing.assert_allclose(g.flat, per.mean(axis=0), rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", ["auto", "gram", "instantiate"])
def test_per_sample_grad_norms(case, prec, method):
    _, tok, t, per, _ = case
    net, rtol, atol = prec
    got = net.per_sample_grad_norms(tok, t.astype(net.dtype), method=method)
    np.testing.assert_allclose(got, np.linalg.norm(per, axis=1), rtol=rtol)
    by_layer = net.per_sample_grad_norms(tok, t.astype(net.dtype), method=method, per_layer=True)
    cuts = np.cumsum([0] + [sum(p.size for p in L.params) for L in net.layers])
    ref = np.stack([np.linalg.norm(per[:, a:b], axis=1) for a, b in zip(cuts[:-1], cuts[1:])], axis=1)
    np.testing.assert_allclose(by_layer, ref, rtol=rtol)


def test_per_sample_grads_and_clipped_grad(case, prec):
    _, tok, t, per, _ = case
    net, rtol, atol = prec
    np.testing.assert_allclose(net.per_sample_grads(tok, t.astype(net.dtype)).flat, per, rtol=rtol, atol=atol)
    C = 0.5 * np.median(np.linalg.norm(per, axis=1))
    clip = np.minimum(1.0, C / np.linalg.norm(per, axis=1))
    got = net.clipped_grad(tok, t.astype(net.dtype), max_norm=C).flat
    np.testing.assert_allclose(got, (clip[:, None] * per).sum(axis=0) / B, rtol=rtol, atol=atol)


def test_ntk_full_trace_and_x2(case, prec):
    _, tok, _, _, J = case
    net, rtol, atol = prec
    K = np.einsum("iop,jqp->ijoq", J, J)  # (N1, N2, T·O, T·O): a sample's outputs flattened
    scale = np.abs(K).max()
    np.testing.assert_allclose(jg.ntk(net, tok), K, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(jg.ntk(net, tok, trace=True), np.einsum("iop,jop->ij", J, J), rtol=rtol,
                               atol=rtol * scale)
    np.testing.assert_allclose(net.ntk(tok[:2], tok[1:]), K[:2, 1:], rtol=rtol, atol=rtol * scale)


def test_ggn_vp_and_diagonal(case, prec):
    _, tok, t, _, J = case
    net, rtol, atol = prec
    v = np.random.default_rng(2).standard_normal(net.n_params)
    scale = 2.0 / (B * T * O)  # the mse's Hessian over the batch mean of per-sample means
    ref = scale * np.einsum("bop,boq,q->p", J, J, v)
    np.testing.assert_allclose(net.ggn_vp(tok, v.astype(net.dtype)), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    ref = scale * np.einsum("bop,bop->p", J, J)
    np.testing.assert_allclose(net.ggn_diagonal(tok, t.astype(net.dtype)).flat, ref, rtol=rtol,
                               atol=rtol * np.abs(ref).max())


def test_report_takes_token_batches_and_compiled_step_refuses_them(case):
    net, tok, t, _, _ = case
    report = jg.gradient_flow(net, tok, t)
    assert [b.kind for b in report.blocks] == ["embedding", "residual", "residual", "dense"]
    assert report.jacobian_singular_values.shape == (B, T * O)  # of the embedded input: (T·O, T·d) per sample, O < d
    with pytest.raises(ValueError, match=r"compile: layer 0 \(Embedding\(11, 8\)\) runs on token batches"):
        net.compile(B)
    with pytest.raises(ValueError, match=r"compile_jacobian: layer 0 \(Embedding"):
        net.compile_jacobian(B)
    body = jg.Sequential(net.layers[1:])  # float (B, T, d) batches, no Embedding
    x = np.random.default_rng(3).standard_normal((B, T, d))
    assert jg.gradient_flow(body, x).blocks[0].h_in == T * d
    with pytest.raises(ValueError, match=r"layer 0\.1 \(MultiHeadAttention\(d=8, heads=2"):
        body.compile(B)


def test_token_ids_are_checked_by_the_first_layer(case):
    net = case[0]
    with pytest.raises(TypeError, match=r"layer 0 \(Embedding\(11, 8\)\): tokens have dtype float64"):
        net.forward(np.zeros((2, 3)))
    with pytest.raises(IndexError, match=r"token id 11 at \(sample, position\) \(1, 2\) is out of range"):
        jg.ntk(net, np.array([[0, 1, 2], [3, 4, 11]]))
    with pytest.raises(ValueError, match=r"x2 has shape \(2, 4\): token ids \(N, T\) with x1's T = 3"):
        jg.ntk(net, np.zeros((2, 3), dtype=int), np.zeros((2, 4), dtype=int))
    y, cache = net.forward(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"grad_y has shape \(2, 3\) .* needs \(2, 3, 3\)"):
        net.backward(cache, np.zeros((2, 3)))


def test_gelu_dense_evaluates_erfc_once_per_pass(monkeypatch):
    """A GELU Dense layer makes φ'(h) with φ(h) (``Activation.f_and_df``: one erfc over h, not two):
    loss_and_grads runs erfc once per GELU layer, and its gradients equal finite differences."""
    import jacgrad.elementwise.activations as acts

    calls = []
    real = acts.erfc
    monkeypatch.setattr(acts, "erfc", lambda x: calls.append(x.shape) or real(x))
    rng = np.random.default_rng(4)
    L = jg.layers
    net = jg.Sequential([L.Dense(rng.standard_normal((4, 6)), rng.standard_normal(6), "gelu"),
                         L.Residual([L.LayerNorm(np.ones(6)), L.Dense(rng.standard_normal((6, 6)), None, "gelu")]),
                         L.Dense(rng.standard_normal((6, 2)))])
    x, t = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 2))
    loss, g = net.loss_and_grads(x, t)
    assert calls == [(15, 6), (15, 6)]
    W, eps = net.layers[1].layers[1].W, 1e-6
    fd = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        W[idx] += eps
        up = jg.losses.mse(net(x), t)[0]
        W[idx] -= 2 * eps
        fd[idx] = (up - jg.losses.mse(net(x), t)[0]) / (2 * eps)
        W[idx] += eps
    np.testing.assert_allclose(g.layers[1][1]["W"], fd, rtol=1e-6, atol=1e-9)  # the inner GELU Dense's ∂W
