"""Conv1d / Conv2d against torch: forward, input and parameter gradients (float64 to 1e-10,
float32 to 1e-4), the factor's adjoint test, JVP against torch.func.jvp, per-sample gradients
from the (A, Δ) leaf against torch.func vmap(grad), edge cases and the error messages."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.conv import im2col as _im2col

torch = pytest.importorskip("torch", reason="the conv layers are checked against torch")
F = torch.nn.functional

TOL = {np.float64: 1e-10, np.float32: 1e-4}

# (C_in, C_out, kernel, stride, padding, dilation, groups, spatial): one row per case
CASES2D = [
    (3, 4, 3, 1, 1, 1, 1, (7, 8)),
    (3, 4, 2, 3, 0, 1, 1, (8, 7)),             # stride > kernel
    (2, 4, 3, 1, 2, 2, 1, (7, 7)),             # dilation
    (4, 4, 3, 1, 1, 1, 4, (6, 6)),             # depthwise
    (4, 6, 3, 2, 1, 1, 2, (7, 9)),             # groups
    (3, 4, 4, 1, "same", 1, 1, (6, 7)),        # same, even kernel: torch's asymmetric padding
    (3, 4, (2, 3), 1, "same", (2, 1), 1, (6, 7)),
    (3, 5, 1, 1, 0, 1, 1, (5, 5)),             # 1x1
    (3, 4, 3, 1, "valid", 1, 1, (5, 6)),
    (2, 3, (3, 2), (2, 1), (1, 0), 1, 1, (7, 5)),
]
CASES1D = [(3, 4, 3, 1, 1, 1, 1, 9), (4, 4, 4, 1, "same", 2, 4, 10), (2, 6, 2, 3, 0, 1, 2, 11)]


def _close(a, b, dtype):
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()))
    assert float(np.abs(np.asarray(a, np.float64) - b).max()) <= TOL[dtype] * scale


def _layer(cls, case, dtype, rng, activation="tanh", bias=True, B=2):
    C, O, k, s, p, d, g, sp = case
    ks = (k,) if cls is jg.layers.Conv1d else ((k, k) if isinstance(k, int) else k)
    W = rng.standard_normal((O, C // g) + ks).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    x = rng.standard_normal((B, C) + ((sp,) if cls is jg.layers.Conv1d else sp)).astype(dtype)
    L = cls(W, b, stride=s, padding=p, dilation=d, groups=g, activation=activation)
    conv = F.conv1d if cls is jg.layers.Conv1d else F.conv2d
    f = lambda xt, Wt, bt: torch.tanh(conv(xt, Wt, bt, stride=s, padding=p, dilation=d, groups=g)) \
        if activation == "tanh" else F.relu(conv(xt, Wt, bt, stride=s, padding=p, dilation=d, groups=g))
    return L, x, W, b, f


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,case", [(jg.layers.Conv2d, c) for c in CASES2D] + [(jg.layers.Conv1d, c) for c in CASES1D])
def test_forward_and_gradients_match_torch(cls, case, dtype):
    rng = np.random.default_rng(0)
    L, x, W, b, f = _layer(cls, case, dtype, rng)
    xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    yt = f(xt, Wt, bt)
    y, state = L.forward(x)
    _close(y, yt.detach().numpy(), dtype)
    assert y.dtype == dtype
    g = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.tensor(g))
    grads = [np.empty_like(W), np.empty_like(b)]
    gin, _ = L.backward(state, g, grads)
    _close(gin, xt.grad.numpy(), dtype)
    _close(grads[0], Wt.grad.numpy(), dtype)
    _close(grads[1], bt.grad.numpy(), dtype)


@pytest.mark.parametrize("cls,case", [(jg.layers.Conv2d, c) for c in CASES2D] + [(jg.layers.Conv1d, c) for c in CASES1D])
def test_factor_adjoint_jvp_and_spectral_norm(cls, case):
    rng = np.random.default_rng(1)
    L, x, W, b, f = _layer(cls, case, np.float64, rng)
    _, state = L.forward(x)
    J = L.factor(state)
    u, v = rng.standard_normal((2, J.h_in)), rng.standard_normal((2, J.h_out))
    lhs, rhs = float(np.sum(v * J.jvp(u))), float(np.sum(J.vjp(v) * u))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    # JVP against torch.func.jvp of the layer as a function of its input
    fx = lambda xt: f(xt, torch.tensor(W), torch.tensor(b))
    _, jt = torch.func.jvp(fx, (torch.tensor(x),), (torch.tensor(u.reshape(x.shape)),))
    _close(J.jvp(u), jt.numpy().reshape(2, -1), np.float64)
    # stacks agree with rows, dense agrees with torch's Jacobian, Lanczos with its SVD
    stack = rng.standard_normal((2, 3, J.h_in))
    _close(J.jvp_stack(stack)[:, 1], J.jvp(stack[:, 1]), np.float64)
    dense = torch.func.vmap(torch.func.jacrev(lambda xi: fx(xi[None])[0]))(torch.tensor(x)).numpy()
    _close(J.dense(), dense.reshape(2, J.h_out, J.h_in), np.float64)
    top = np.linalg.svd(J.dense(), compute_uv=False)[:, 0]
    np.testing.assert_allclose(J.spectral_norm(), top, rtol=1e-9)
    assert np.all(J.norm_bound() >= top * (1 - 1e-12))


@pytest.mark.parametrize("cls,case", [(jg.layers.Conv2d, CASES2D[0]), (jg.layers.Conv2d, CASES2D[4]),
                                      (jg.layers.Conv1d, CASES1D[2])])
def test_patch_leaf_gives_per_sample_gradients(cls, case):
    """``A_bᵀΔ_b`` from ``param_input`` and δ, and the ``sq`` norms, against torch.func vmap(grad)."""
    rng = np.random.default_rng(2)
    L, x, W, b, f = _layer(cls, case, np.float64, rng, B=3)
    y, state = L.forward(x)
    g = rng.standard_normal(y.shape)
    sq = np.zeros(3)
    _, delta = L.backward(state, g, [np.empty_like(W), np.empty_like(b)], sq=sq)

    def loss(Wt, bt, xi, gi):
        return (f(xi[None], Wt, bt)[0] * gi).sum()

    gW, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        torch.tensor(W), torch.tensor(b), torch.tensor(x), torch.tensor(g))
    A = L.param_input(state)
    B, O = delta.shape[:2]
    D = delta.reshape(B, O, -1).transpose(0, 2, 1)               # Δ: (B, T, C_out)
    G = L.groups
    if G == 1:
        per = np.einsum("btp,bto->bop", A, D)
    else:
        Dg = D.reshape(B, D.shape[1], G, O // G)
        per = np.einsum("bgtp,btgo->bgop", A, Dg).reshape(B, O, -1)
    _close(per.reshape(gW.shape), gW.numpy(), np.float64)
    _close(D.sum(axis=1), gb.numpy(), np.float64)
    ref = (gW.numpy() ** 2).reshape(3, -1).sum(1) + (gb.numpy() ** 2).sum(1)
    np.testing.assert_allclose(sq, ref, rtol=1e-10)


def test_max_memory_chunks_give_the_same_results():
    rng = np.random.default_rng(3)
    W, x = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((5, 3, 6, 6))
    whole = jg.layers.Conv2d(W, None, padding=1, activation="relu")
    one_sample = 3 * 9 * 36 * 8
    chunked = jg.layers.Conv2d(W, None, padding=1, activation="relu", max_memory=2 * one_sample)
    (y1, s1), (y2, s2) = whole.forward(x), chunked.forward(x)
    np.testing.assert_array_equal(y1, y2)
    g = rng.standard_normal(y1.shape)
    r1, r2 = [np.empty_like(W)], [np.empty_like(W)]
    np.testing.assert_allclose(whole.backward(s1, g, r1)[0], chunked.backward(s2, g, r2)[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(r1[0], r2[0], rtol=1e-12)
    assert _im2col.batch_chunks(5, one_sample, 2 * one_sample) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(ValueError, match="below one sample's patch matrix"):
        jg.layers.Conv2d(W, max_memory=10).forward(x)


def test_batch_of_one_no_bias_identity_and_shapes():
    rng = np.random.default_rng(4)
    W, x = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((1, 3, 4, 5))
    L = jg.layers.Conv2d(W, in_shape=(3, 4, 5))
    assert L.names == ("weight",) and L.out_shape == (2, 3, 4) and L.n_in == 60 and L.n_out == 24
    y, state = L.forward(x)
    np.testing.assert_allclose(y, F.conv2d(torch.tensor(x), torch.tensor(W)).numpy(), rtol=1e-12)
    J = L.factor(state)
    assert not J.per_sample                                    # identity: the same C_W for every sample
    assert L.forward_shapes(1) == [(1, 2, 3, 4)] and L.backward_shapes(1) == [(1, 2, 3, 4), (1, 3, 4, 5)]


def test_errors_name_the_layer_and_the_shapes():
    W = np.ones((4, 3, 3, 3))
    L = jg.layers.Conv2d(W)
    with pytest.raises(ValueError, match=r"Conv2d: input of shape \(2, 5, 8, 8\) has 5 channels.*C = 3"):
        L.forward(np.ones((2, 5, 8, 8)))
    with pytest.raises(ValueError, match=r"Conv2d: the input's spatial size 2×2.*smaller than the kernel's span 3×3"):
        L.forward(np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="padding 'full' is not one of 'valid', 'same'"):
        jg.layers.Conv2d(W, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        jg.layers.Conv2d(W, stride=2, padding="same").forward(np.ones((1, 3, 5, 5)))
    with pytest.raises(ValueError, match="groups must be an int ≥ 1 dividing C_out = 4"):
        jg.layers.Conv2d(W, groups=3)
    with pytest.raises(ValueError, match=r"Conv1d: W must be \(C_out, C_in/groups, k\)"):
        jg.layers.Conv1d(W)
    with pytest.raises(ValueError, match="forward_shapes needs in_shape"):
        L.forward_shapes(2)


def test_small_cnn_end_to_end_against_torch_autograd():
    """conv-relu-pool-conv-relu-adaptiveavgpool-flatten-dense, run layer by layer, against torch."""
    rng = np.random.default_rng(5)
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding="same"),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).double()
    c1, c2, lin = model[0], model[3], model[7]
    t = lambda p: p.detach().numpy()
    layers = [jg.layers.Conv2d(t(c1.weight), t(c1.bias), padding=1, activation="relu"), jg.layers.MaxPool2d(2),
              jg.layers.Conv2d(t(c2.weight), t(c2.bias), padding="same", activation="relu"),
              jg.layers.AdaptiveAvgPool2d(1), jg.layers.Flatten(), jg.layers.Dense(t(lin.weight).T.copy(), t(lin.bias))]
    x = rng.standard_normal((4, 3, 8, 8))
    z, states = x, []
    for L in layers:
        z, st = L.forward(z)
        states.append(st)
    xt = torch.tensor(x, requires_grad=True)
    yt = model(xt)
    np.testing.assert_allclose(z, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = rng.standard_normal(z.shape)
    yt.backward(torch.tensor(g))
    grads = [[np.empty_like(p) for p in L.params] for L in layers]
    for L, st, gr in zip(reversed(layers), reversed(states), reversed(grads)):
        g, _ = L.backward(st, g, gr)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for mine, ref in [(grads[0][0], c1.weight.grad), (grads[0][1], c1.bias.grad), (grads[2][0], c2.weight.grad),
                      (grads[2][1], c2.bias.grad), (grads[5][0], lin.weight.grad.T), (grads[5][1], lin.bias.grad)]:
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-10, atol=1e-12)
    # the whole input Jacobian as a Chain of the layers' factors, against torch.func.jacrev
    C = jg.Chain([L.factor(st) for L, st in zip(layers, states)])
    ref = torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(C.jacobian(), ref.reshape(4, 10, -1), rtol=1e-10, atol=1e-12)
