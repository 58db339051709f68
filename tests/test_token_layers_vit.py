"""The token layers of a ViT (``jacgrad.tokens``: ``PositionalEmbedding``, ``ClassToken``, ``SelectToken``,
``TokenMean``, ``ImageToTokens``) against torch: each layer's forward and Jacobian factor (VJP, JVP,
their stacks, the adjoint identity, the dense per-sample Jacobian) against ``torch.func``; inside a
network, the batch gradient, per-sample gradients and norms (all methods), the NTK and the
Gauss-Newton products against ``torch.func`` (float64 to 1e-10, float32 to 1e-4); files round trip;
bad inputs raise errors that name the layer and the shapes."""

import numpy as np
import pytest

import jacgrad as jg
from vit_reference import TOL, check_factor, check_products, unflatten

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
L = jg.layers
DTYPES = [np.float64, np.float32]


def _rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------- PositionalEmbedding
@pytest.mark.parametrize("dtype", DTYPES)
def test_positional_embedding_factor_matches_torch(dtype):
    rng = _rng()
    P = rng.standard_normal((7, 4)).astype(dtype)
    x = rng.standard_normal((3, 5, 4)).astype(dtype)
    layer = L.PositionalEmbedding(P)
    F, state = check_factor(layer, x, lambda X: X + torch.tensor(P)[:X.shape[1]], TOL[dtype])
    assert F.tokens == 5 and F.h_in == F.h_out == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_positional_embedding_gradients_match_torch(dtype):
    """∂table: Σ_i δ_i in rows :T, zero below; per sample ‖δ_i‖²."""
    rng = _rng()
    P = rng.standard_normal((7, 4)).astype(dtype)
    x, g = rng.standard_normal((3, 5, 4)).astype(dtype), rng.standard_normal((3, 5, 4)).astype(dtype)
    layer = L.PositionalEmbedding(P)
    Pt = torch.tensor(P, requires_grad=True)
    (gP,) = torch.autograd.grad(torch.tensor(x) + Pt[:5], [Pt], torch.tensor(g))
    _, state = layer.forward(x)
    grads, sq = [np.full_like(P, np.nan)], np.zeros(3, dtype)
    gin, delta = layer.backward(state, g, grads, sq=sq)
    np.testing.assert_allclose(grads[0], gP.numpy(), rtol=TOL[dtype], atol=TOL[dtype])
    assert (grads[0][5:] == 0).all()
    np.testing.assert_allclose(gin, g)
    assert gin is not g
    np.testing.assert_allclose(sq, (g ** 2).sum(axis=(1, 2)), rtol=TOL[dtype])


def _gpt_like(dtype, T_max=6):
    """Dense -> PositionalEmbedding -> LayerNorm -> Dense on (B, T, 3), and its torch function."""
    rng = _rng()
    n, d, o = 3, 5, 2
    W1, b1 = rng.standard_normal((n, d)) / 2, rng.standard_normal(d)
    P, gam, bet = rng.standard_normal((T_max, d)), 1 + rng.standard_normal(d) / 4, rng.standard_normal(d) / 4
    W2, b2 = rng.standard_normal((d, o)) / 2, rng.standard_normal(o)
    net = jg.Sequential([L.Dense(W1.astype(dtype), b1.astype(dtype), "tanh"), L.PositionalEmbedding(P.astype(dtype)),
                         L.LayerNorm(gam.astype(dtype), bet.astype(dtype)), L.Dense(W2.astype(dtype), b2.astype(dtype), "tanh")])
    shapes = [(n, d), (d,), (T_max, d), (d,), (d,), (d, o), (o,)]

    def f(theta, xi):
        w1, c1, p, g_, b_, w2, c2 = unflatten(theta, shapes)
        h = torch.tanh(xi @ w1 + c1) + p[:xi.shape[0]]
        return torch.tanh(torch.nn.functional.layer_norm(h, (d,), g_, b_, 1e-5) @ w2 + c2)
    return net, f


@pytest.mark.parametrize("dtype", DTYPES)
def test_positional_embedding_network_products_match_torch_func(dtype):
    net, f = _gpt_like(dtype)
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((3, 4, 3)).astype(dtype), rng.standard_normal((3, 4, 2)).astype(dtype)
    check_products(net, f, x, t, TOL[dtype])
    if dtype == np.float64:  # the whole per-sample input Jacobian of a token chain
        X = torch.tensor(x)
        theta = torch.tensor(np.concatenate([p.ravel() for _, Lr in L.leaf_layers(net.layers) for p in Lr.params]))
        Jx = torch.func.vmap(torch.func.jacrev(lambda xi: f(theta, xi)))(X).reshape(3, 8, 12).numpy()
        np.testing.assert_allclose(net.jacobian(x), Jx, rtol=1e-10, atol=1e-12)


def test_positional_embedding_file_round_trip(tmp_path):
    net, _ = _gpt_like(np.float64)
    x = _rng().standard_normal((2, 6, 3))
    for suffix in (".npz", ".safetensors"):
        net.save(tmp_path / f"net{suffix}")
        back = jg.Sequential.load(tmp_path / f"net{suffix}")
        assert isinstance(back.layers[1], L.PositionalEmbedding) and back.layers[1].T_max == 6
        np.testing.assert_array_equal(back(x), net(x))


def test_positional_embedding_bad_input():
    layer = L.PositionalEmbedding(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"T = 5 tokens, more than the table's T_max = 4"):
        layer.forward(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"PositionalEmbedding\(4, 3\).*needs a token batch \(B, T, 3\)"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"needs a token batch \(B, T, 3\)"):
        layer.forward(np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="table must be 2-D"):
        L.PositionalEmbedding(np.zeros(4))
    net = jg.Sequential([L.Dense(np.ones((2, 3))), layer])
    with pytest.raises(ValueError, match="more than the table's T_max"):
        net(np.zeros((1, 5, 2)))
