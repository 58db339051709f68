"""Per-sample input Jacobians of token batches ``(B, T, d)``: ``jacobian_chain(cache).jacobian()`` and
``net.jacobian(x)`` are each sample's ``(T·d_out, T·d_in)`` Jacobian of its flattened output by its
flattened input, and their spectra, against ``torch.func.vmap(torch.func.jacrev)`` on the same torch
model in float64 (a Dense/LayerNorm/Residual stack; a pre-norm attention block)."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

B, T, d, F, O = 3, 4, 6, 10, 5


def _stack():
    from jacgrad.io.interop.torch_blocks import Residual

    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), nn.Tanh(),
                         Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, F), nn.GELU(), nn.Linear(F, d))),
                         nn.LayerNorm(d), nn.Linear(d, O)).double()


def _attention_block():
    from jacgrad.io.interop.torch_blocks import Residual

    nn = torch.nn
    torch.manual_seed(1)
    return nn.Sequential(Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True))),
                         Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, F), nn.GELU(), nn.Linear(F, d)))).double()


def _torch_forward(m):
    """``z: (1, T, d) -> (1, T, d_out)`` through ``m`` (an attention block's self-attention spelled out:
    torch's ``nn.MultiheadAttention`` takes query, key and value)."""
    def run(z, mod):
        if isinstance(mod, torch.nn.MultiheadAttention):
            return mod(z, z, z, need_weights=False)[0]
        if hasattr(mod, "inner"):
            return z + mod.scale * run(z, mod.inner)
        if isinstance(mod, torch.nn.Sequential):
            for sub in mod:
                z = run(z, sub)
            return z
        return mod(z)
    return lambda z: run(z, m)


def _reference(m, x):
    """``(B, T·d_out, T·d_in)`` by ``vmap(jacrev)`` of one sample's ``(T, d) -> (T, d_out)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = _torch_forward(m)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        J = torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(torch.from_numpy(x))
    return J.reshape(B, T * J.shape[2], T * d).numpy()


@pytest.fixture(params=["stack", "attention block"])
def case(request):
    m = _stack() if request.param == "stack" else _attention_block()
    net = jg.Sequential.from_torch(m)
    x = np.random.default_rng(2).standard_normal((B, T, d))
    return net, x, _reference(m, x)


@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
def test_token_jacobian_matches_jacrev(case, order):
    net, x, ref = case
    chain = net.jacobian_chain(net.forward(x)[1])
    assert chain.tokens == T
    J = chain.jacobian(order)
    assert J.shape == ref.shape
    np.testing.assert_allclose(J, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(net.jacobian(x, order), ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_token_spectra_match_the_reference_svd(case):
    net, x, ref = case
    chain = net.jacobian_chain(net.forward(x)[1])
    s = np.linalg.svd(ref, compute_uv=False)
    np.testing.assert_allclose(chain.singular_values(), s, rtol=0, atol=1e-10 * s.max())
    for method in ("exact", "lanczos"):
        np.testing.assert_allclose(chain.spectral_norm(method), s[:, 0], rtol=1e-9)
    np.testing.assert_allclose(chain.rows([2, 0]).spectral_norm("exact"), s[[2, 0], 0], rtol=1e-10)


def test_token_jacobian_over_max_memory_is_refused(case):
    net, x, _ = case
    chain = net.jacobian_chain(net.forward(x)[1])
    with pytest.raises(ValueError, match=rf"jacobian: the per-sample Jacobians of this token batch \(B={B}, T={T}, "
                                         rf"widths .*\({B}, {T * chain.n_out}, {T * d}\)\) pass through .* bytes, "
                                         r"over max_memory=1,000 bytes"):
        chain.jacobian(max_memory=1000)
    assert chain.jacobian(max_memory=None).shape == (B, T * chain.n_out, T * d)


def test_embedding_chain_has_an_empty_input_jacobian():
    L = jg.layers
    E = np.random.default_rng(0).standard_normal((7, d))
    net = jg.Sequential([L.Embedding(E), L.LayerNorm(np.ones(d))])
    tok = np.array([[0, 3, 3, 6], [1, 2, 5, 0]])
    J = net.jacobian(tok)
    assert J.shape == (2, T * d, 0)
