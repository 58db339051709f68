"""The token layers of a ViT (``jacgrad.tokens``: ``PositionalEmbedding``, ``ClassToken``, ``SelectToken``,
``TokenMean``, ``ImageToTokens``) against torch: each layer's forward and Jacobian factor (VJP, JVP,
their stacks, the adjoint identity, the dense per-sample Jacobian) against ``torch.func``; inside a
network, the batch gradient, per-sample gradients and norms (all methods), the NTK and the
Gauss-Newton products against ``torch.func`` (float64 to 1e-10, float32 to 1e-4); files round trip;
bad inputs raise errors that name the layer and the shapes."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
from vit_reference import TOL, check_factor, check_products, unflatten  # noqa: E402 - it imports torch
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


# ---------------------------------------------------------------------------- ClassToken, SelectToken, TokenMean
def _token_maps(dtype):
    """(layer, its torch map of a (B, T, d) batch), d = 4."""
    c = _rng().standard_normal(4).astype(dtype)
    return [(L.ClassToken(c), lambda X: torch.cat([torch.tensor(c).expand(X.shape[0], 1, 4), X], 1)),
            (L.SelectToken(0, 4), lambda X: X[:, 0]),
            (L.SelectToken(-2, 4), lambda X: X[:, -2]),
            (L.TokenMean(4), lambda X: X.mean(1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", range(4))
def test_token_map_factors_match_torch(dtype, which):
    layer, fx = _token_maps(dtype)[which]
    x = _rng().standard_normal((3, 5, 4)).astype(dtype)
    F, state = check_factor(layer, x, fx, TOL[dtype])
    np.testing.assert_allclose(F.rows(slice(1, 3)).vjp_stack(np.ones((2, 2) + F.out_lead, dtype)),
                               F.vjp_stack(np.ones((3, 2) + F.out_lead, dtype))[1:])
    g = _rng().standard_normal((3,) + F.out_lead).astype(dtype)
    X = torch.tensor(x, requires_grad=True)
    (gx,) = torch.autograd.grad(fx(X), [X], torch.tensor(g))
    grads = [np.full(p.shape, np.nan, dtype) for p in layer.params]
    gin, delta = layer.backward(state, g, grads)
    np.testing.assert_allclose(gin, gx.numpy(), rtol=TOL[dtype], atol=TOL[dtype])
    if layer.params:  # the class token: Σ_i g_i,0
        np.testing.assert_allclose(grads[0], g[:, 0].sum(axis=0), rtol=TOL[dtype])


def _readout_net(dtype, readout, T_max=6):
    """Dense(tanh) -> ClassToken -> PositionalEmbedding -> LayerNorm -> readout -> Dense on (B, T, 3)."""
    rng = _rng()
    n, d, o = 3, 5, 2
    W1, b1, c = rng.standard_normal((n, d)) / 2, rng.standard_normal(d), rng.standard_normal(d)
    P, gam, bet = rng.standard_normal((T_max, d)), 1 + rng.standard_normal(d) / 4, rng.standard_normal(d) / 4
    W2, b2 = rng.standard_normal((d, o)) / 2, rng.standard_normal(o)
    arrays = [a.astype(dtype) for a in (W1, b1, c, P, gam, bet, W2, b2)]
    W1, b1, c, P, gam, bet, W2, b2 = arrays
    last = L.SelectToken(0) if readout == "select" else L.TokenMean()
    net = jg.Sequential([L.Dense(W1, b1, "tanh"), L.ClassToken(c), L.PositionalEmbedding(P), L.LayerNorm(gam, bet),
                         last, L.Dense(W2, b2, "tanh")])
    shapes = [a.shape for a in arrays]

    def f(theta, xi):
        w1, c1, cl, p, g_, b_, w2, c2 = unflatten(theta, shapes)
        h = torch.cat([cl[None], torch.tanh(xi @ w1 + c1)], 0)
        h = torch.nn.functional.layer_norm(h + p[:h.shape[0]], (d,), g_, b_, 1e-5)
        h = h[0] if readout == "select" else h.mean(0)
        return torch.tanh(h @ w2 + c2)
    return net, f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("readout", ["select", "mean"])
def test_token_readout_network_products_match_torch_func(dtype, readout):
    """A token network read out to (B, d): the token axis changes twice (T -> T + 1 -> none)."""
    net, f = _readout_net(dtype, readout)
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((4, 5, 3)).astype(dtype), rng.standard_normal((4, 2)).astype(dtype)
    assert net.layers[4].n_in == 5 and net(x).shape == (4, 2)
    check_products(net, f, x, t, TOL[dtype])
    if dtype == np.float64:
        theta = torch.tensor(np.concatenate([p.ravel() for _, Lr in L.leaf_layers(net.layers) for p in Lr.params]))
        Jx = torch.func.vmap(torch.func.jacrev(lambda xi: f(theta, xi)))(torch.tensor(x)).reshape(4, 2, 15).numpy()
        np.testing.assert_allclose(net.jacobian(x), Jx, rtol=1e-10, atol=1e-12)


def test_token_maps_file_round_trip(tmp_path):
    for readout in ("select", "mean"):
        net, _ = _readout_net(np.float64, readout)
        x = _rng().standard_normal((2, 4, 3))
        net.save(tmp_path / "net.npz")
        back = jg.Sequential.load(tmp_path / "net.npz")
        assert [L_.kind for L_ in back.layers] == [L_.kind for L_ in net.layers]
        np.testing.assert_array_equal(back(x), net(x))
    assert jg.Sequential.load(tmp_path / "net.npz").layers[4].spec() == {"kind": "token_mean", "width": 5}


def test_token_maps_bad_input():
    with pytest.raises(IndexError, match=r"SelectToken\(3, 4\).*index 3 is out of range for an input of T = 3 tokens"):
        L.SelectToken(3, 4).forward(np.zeros((2, 3, 4)))
    with pytest.raises(IndexError, match="index -4 is out of range"):
        L.SelectToken(-4, 4).forward(np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="index must be an int"):
        L.SelectToken(1.0)
    with pytest.raises(ValueError, match=r"TokenMean\(4\).*\(2, 4\); needs a token batch \(B, T, 4\)"):
        L.TokenMean(4).forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="ClassToken: token must be 1-D"):
        L.ClassToken(np.zeros((1, 1, 4)))
    with pytest.raises(ValueError, match=r"ClassToken\(4\).*needs a token batch \(B, T, 4\)"):
        L.ClassToken(np.zeros(4)).forward(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="has no width yet"):
        L.TokenMean().forward(np.zeros((2, 3, 4)))
    net = jg.Sequential([L.Dense(np.ones((3, 4))), L.SelectToken(0), L.Dense(np.ones((4, 2)))])
    with pytest.raises(ValueError, match=r"SelectToken\(0, 4\) takes token batches \(B, T, d\)"):
        net(np.zeros((2, 3)))  # a (B, d) batch has no tokens to read


# ---------------------------------------------------------------------------- ImageToTokens
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 4), (3, 5)])
def test_image_to_tokens_factor_matches_torch(dtype, shape):
    layer = L.ImageToTokens(in_shape=shape)
    x = _rng().standard_normal((2,) + shape).astype(dtype)
    F, state = check_factor(layer, x, lambda X: X.flatten(2).transpose(1, 2), TOL[dtype], flat_in=True)
    assert layer.out_shape == (int(np.prod(shape[1:])), 3) and F.tokens == layer.out_shape[0]
    g = _rng().standard_normal((2,) + layer.out_shape).astype(dtype)
    gin, delta = layer.backward(state, g)
    np.testing.assert_array_equal(gin, np.swapaxes(g, 1, 2).reshape(x.shape))


def test_image_to_tokens_bad_input():
    layer = L.ImageToTokens(in_shape=(3, 2, 2))
    with pytest.raises(ValueError, match=r"ImageToTokens\(in_shape=\(3, 2, 2\)\).*needs images \(B, 3, 2, 2\)"):
        layer.forward(np.zeros((1, 3, 2, 3)))
    with pytest.raises(ValueError, match="at least one spatial axis"):
        L.ImageToTokens(in_shape=(3,))
    with pytest.raises(ValueError, match="takes image batches"):
        layer.output_lead((2, 4))


@pytest.mark.parametrize("readout", ["select", "mean"])
def test_compiled_step_of_a_token_readout_network_is_loss_and_grads(readout):
    """``compile(B, tokens=T)`` of a network whose output has no token axis: its buffers take each
    layer's own lead; bitwise the numbers of ``loss_and_grads``."""
    net, _ = _readout_net(np.float64, readout)
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 2))
    value, g = net.loss_and_grads(x, t)
    step = net.compile(4, tokens=5)
    for _ in range(2):
        v2, g2 = step(x, t)
        assert v2 == value
        np.testing.assert_array_equal(g2.flat, g.flat)
        np.testing.assert_array_equal(g2.input, g.input)
    with pytest.raises(ValueError, match=r"layer 1 \(ClassToken\(5\)\) runs on token batches"):
        net.compile(4)
