"""``MultiHeadAttention`` and ``Embedding`` on device arrays (the fake CuPy of
tests/fake_cupy_transfers.py, NumPy underneath): every result stays on the device, the numbers
equal the NumPy ones, and no host transfer is made — except the Embedding's token range check
(one ``min`` and one ``max``, as torch's device-side index assert)."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.tokens.embedding_leaf import embedding_fill, embedding_ggn_diagonal, embedding_ntk, embedding_sq_norms

from fake_cupy_transfers import install

pytestmark = pytest.mark.usefixtures("one_blas_thread")

B, T, d, V = 3, 5, 8, 11


def _attention(to):
    rng = np.random.default_rng(0)
    W = lambda *s: to(rng.standard_normal(s) / np.sqrt(s[0]))  # noqa: E731
    return jg.layers.MultiHeadAttention(W(d, d), W(d, d), W(d, d), W(d, d), heads=2, causal=True,
                                        bq=W(d), bk=W(d), bv=W(d), bo=W(d))


def _attention_run(L, x, mask, g, S):
    y, st = L.forward(x, key_padding_mask=mask)
    xp = jg.get_xp(x)
    grads = [xp.empty(p.shape, dtype=p.dtype) for p in L.params]
    gx, deltas = L.backward(st, g, grads)
    F = L.factor(st)
    Gs, A_in = F.param_vjp_stack(S)
    return [y, gx, *deltas, *grads, F.jvp(g), F.vjp(g), *Gs, A_in, F.norm_bound()]


def test_attention_on_device_without_host_transfers(monkeypatch):
    rng = np.random.default_rng(1)
    x, g, S = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d)), rng.standard_normal((B, 2, T, d))
    mask = np.zeros((B, T), dtype=bool)
    mask[1, 3:] = True
    mask[2, :] = True   # a sample whose every key is masked
    want = _attention_run(_attention(np.asarray), x, mask, g, S)
    fake = install(monkeypatch)
    L = _attention(fake.asarray)
    fake.reset()
    got = _attention_run(L, fake.asarray(x), fake.asarray(mask), fake.asarray(g), fake.asarray(S))
    assert fake.transfers == 0, dict(fake.where)
    for a, b in zip(got, want):
        assert jg.backend.is_gpu_array(a)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)


def _embedding_run(E, tok, g, G):
    xp = jg.get_xp(g)
    y, st = E.forward(tok)
    grads = [xp.empty((V, d))]
    E.backward(st, g, grads)
    out = [y, grads[0], embedding_sq_norms(st, g, "gram"), embedding_sq_norms(st, g, "instantiate"),
           embedding_fill(st, g, xp.empty((B, V, d))), embedding_ntk(st, G, st, G),
           embedding_ggn_diagonal(st, G, xp.zeros((V, d)))]
    return out


def test_embedding_on_device_with_only_the_range_check_on_the_host(monkeypatch):
    rng = np.random.default_rng(2)
    E0 = rng.standard_normal((V, d))
    tok = rng.integers(0, V, (B, T))
    tok[0, :3] = 4
    g, G = rng.standard_normal((B, T, d)), rng.standard_normal((B, 2, T, d))
    want = _embedding_run(jg.layers.Embedding(E0, padding_idx=0), tok, g, G)
    fake = install(monkeypatch)
    E = jg.layers.Embedding(fake.asarray(E0), padding_idx=0)
    ftok = fake.asarray(tok)
    fake.reset()
    got = _embedding_run(E, ftok, fake.asarray(g), fake.asarray(G))
    assert fake.transfers == 2, dict(fake.where)   # check_tokens: int(tok.min()), int(tok.max())
    for a, b in zip(got, want):
        assert jg.backend.is_gpu_array(a)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)
