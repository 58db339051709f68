"""``net.compile(B, tokens=T)``: the compiled training step on token batches — integer ids ``(B, T)``
into an Embedding-first transformer (Embedding → pre-norm attention block → pre-norm MLP block →
Dense head) and float ``(B, T, d)`` batches into a per-token MLP. Bitwise the numbers of
``loss_and_grads`` (and of ``clipped_grad`` for the private step) on NumPy, against torch autograd
to 1e-10 in float64; buffers made once, parameters read by reference, ``rebind()``; bad input
refused with its reason and nothing half-changed."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

V, d, H, F, O, B, T = 11, 8, 2, 16, 3, 3, 5


def _transformer():
    from jacgrad.io.interop.torch_blocks import Residual

    nn = torch.nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(V, d),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, H, batch_first=True))),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, F), nn.GELU(), nn.Linear(F, d))),
                      nn.Linear(d, O)).double()
    with torch.no_grad():  # biases away from 0
        for name, p in m.named_parameters():
            if "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _torch_grads(m, x, t):
    """torch autograd's mean-squared-error loss and parameter gradients by name (the reference)."""
    m.zero_grad()
    xt = torch.from_numpy(x)
    y = m(xt) if x.dtype.kind == "f" else _forward_tokens(m, xt)
    loss = ((y - torch.from_numpy(t)) ** 2).mean()
    loss.backward()
    return loss.item(), {k: p.grad.numpy().copy() for k, p in m.named_parameters()}


def _forward_tokens(m, tok):
    z = m[0](tok)
    u = m[1].inner[0](z)
    z = z + m[1].inner[1](u, u, u, need_weights=False)[0]
    z = z + m[2].inner(z)
    return m[3](z)


def _same(g, ref):
    assert np.array_equal(g.flat, ref.flat)
    assert g.input is None and ref.input is None or np.array_equal(g.input, ref.input)


@pytest.fixture
def transformer():
    m = _transformer()
    rng = np.random.default_rng(1)
    tok = rng.integers(0, V, (B, T))
    tok[0, 1] = tok[0, 3]  # a repeated token
    return m, jg.Sequential.from_torch(m, copy=True), tok, rng.standard_normal((B, T, O))


def test_transformer_step_is_loss_and_grads_bitwise_and_torch(transformer):
    m, net, tok, t = transformer
    step = net.compile(B, tokens=T)
    loss, g = step(tok, t)
    ref_loss, ref = net.loss_and_grads(tok, t, input_grad=False)
    assert loss == ref_loss
    _same(g, ref)
    tl, tg = _torch_grads(m, tok, t)
    np.testing.assert_allclose(float(loss), tl, rtol=1e-12)
    L = g.layers
    np.testing.assert_allclose(L[0]["E"], tg["0.weight"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(L[1][0]["gamma"], tg["1.inner.0.weight"], rtol=1e-10, atol=1e-13)
    Wqkv = tg["1.inner.1.in_proj_weight"]
    for i, name in enumerate("qkv"):
        np.testing.assert_allclose(L[1][1][f"W{name}"], Wqkv[i * d:(i + 1) * d].T, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(L[1][1]["Wo"], tg["1.inner.1.out_proj.weight"].T, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(L[2][1]["W"], tg["2.inner.1.weight"].T, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(L[3]["W"], tg["3.weight"].T, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(L[3]["b"], tg["3.bias"], rtol=1e-10, atol=1e-13)


def test_buffers_once_parameters_by_reference_and_rebind(transformer):
    _, net, tok, t = transformer
    step = net.compile(B, tokens=T)
    loss, g = step(tok, t)
    flat, nbytes = g.flat, step.nbytes
    head = net.layers[-1]
    head.params[0] -= 0.1 * g.layers[-1]["W"]  # SGD in place: the next call sees it
    loss2, g2 = step(tok, t)
    assert loss2 is loss and g2.flat is flat and step.nbytes == nbytes  # the same buffers
    ref_loss, ref = net.loss_and_grads(tok, t, input_grad=False)
    assert loss2 == ref_loss and np.array_equal(g2.flat, ref.flat)
    kept = step(tok, t, copy=True)[1].flat
    head._W = head.W * 1.5  # replaced, not updated in place (no public setter: what a framework would do)
    with pytest.raises(RuntimeError, match=r"layer 3 \(Dense\) W is no longer the array .*step\.rebind\(\)"):
        step(tok, t)
    assert np.array_equal(g.flat, kept)  # the refused call changed nothing
    step.rebind()
    ref_loss, ref = net.loss_and_grads(tok, t, input_grad=False)
    loss3, g3 = step(tok, t)
    assert loss3 == ref_loss and np.array_equal(g3.flat, ref.flat)


def test_private_token_step_is_clipped_grad_bitwise(transformer):
    _, net, tok, t = transformer
    step = net.compile(B, tokens=T, clip=0.05, noise_multiplier=0.7, seed=3)
    loss, cg = step(tok, t)
    ref = net.clipped_grad(tok, t, max_norm=0.05, noise_multiplier=0.7, seed=3)
    assert loss == net.loss_and_grads(tok, t)[0]
    assert np.array_equal(cg.flat, ref.flat) and np.array_equal(cg.norms, ref.norms)
    assert 0 < cg.clipped_fraction <= 1


def test_per_token_mlp_step_bitwise_and_torch():
    nn = torch.nn
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(d, F), nn.Tanh(), nn.Linear(F, O)).double()
    net = jg.MLP.from_torch(m)
    rng = np.random.default_rng(4)
    x = np.asfortranarray(rng.standard_normal((B, T, d)))  # any layout: the step copies into its buffer
    t = rng.standard_normal((B, T, O))
    step = net.compile(B, tokens=T, input_grad=True)
    loss, g = step(x, t)
    ref_loss, ref = net.loss_and_grads(x, t)
    assert loss == ref_loss
    _same(g, ref)
    assert g.input.shape == (B, T, d)
    tl, tg = _torch_grads(m, np.ascontiguousarray(x), t)
    np.testing.assert_allclose(float(loss), tl, rtol=1e-12)
    for j, k in enumerate(("0", "2")):
        np.testing.assert_allclose(g.weights[j], tg[f"{k}.weight"].T, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(g.biases[j], tg[f"{k}.bias"], rtol=1e-10, atol=1e-13)
    step32 = jg.MLP.from_torch(m, dtype="float32").compile(B, tokens=T)
    with pytest.raises(TypeError, match="x is float64 but the network is float32"):
        step32(x, t.astype(np.float32))


def test_bad_token_input_is_refused_and_changes_nothing(transformer):
    _, net, tok, t = transformer
    step = net.compile(B, tokens=T)
    loss, g = step(tok, t)
    kept_loss, kept = float(loss), g.flat.copy()
    other = np.random.default_rng(9).integers(0, V, (B, T))
    with pytest.raises(ValueError, match=r"token batches of 3 × T=5: x must be integer token ids \(3, 5\), got \(3, 4\)"):
        step(other[:, :4], t)
    with pytest.raises(TypeError, match=r"layer 0 \(Embedding\(11, 8\)\): tokens have dtype float64; needs integer"):
        step(other.astype(np.float64), t)
    bad = other.copy()
    bad[1, 2] = V
    with pytest.raises(IndexError, match=r"token id 11 at \(sample, position\) \(1, 2\) is out of range"):
        step(bad, t)
    with pytest.raises(ValueError, match=r"the target must be \(3, 5, 3\), got \(3, 3\)"):
        step(other, t[:, 0])
    assert float(loss) == kept_loss and np.array_equal(g.flat, kept)


def test_bad_compile_arguments():
    m = _transformer()
    net = jg.Sequential.from_torch(m)
    with pytest.raises(ValueError, match=r"compile: layer 0 \(Embedding\(11, 8\)\) runs on token batches .*tokens=T"):
        net.compile(B)
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        net.compile(B, tokens=0)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy takes \(B, C\) logits"):
        net.compile(B, loss="softmax_cross_entropy", tokens=T)
    L = jg.layers
    cnn = jg.Sequential([L.Conv2d(np.ones((2, 1, 3, 3)), np.zeros(2)), L.Flatten(), L.Dense(np.ones((8, 1)))],
                        in_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"compile\(tokens=5\): layer 0 \(Conv2d.*does not run on token batches"):
        cnn.compile(B, tokens=T)


def test_float32_token_step_is_loss_and_grads_bitwise(transformer):
    m, _, tok, t = transformer
    net = jg.Sequential.from_torch(m, dtype="float32")
    t32 = t.astype(np.float32)
    step = net.compile(B, tokens=T, loss="sigmoid_bce")
    for _ in range(2):  # the second call: the same buffers, the same numbers
        loss, g = step(tok.astype(np.int32), (t32 > 0).astype(np.float32))
        ref_loss, ref = net.loss_and_grads(tok, (t32 > 0).astype(np.float32), loss="sigmoid_bce", input_grad=False)
        assert loss.dtype == np.float32 and loss == ref_loss
        _same(g, ref)
