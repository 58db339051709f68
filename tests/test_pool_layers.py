"""AvgPool2d, MaxPool2d, AdaptiveAvgPool2d(1), Flatten and eval BatchNorm1d/2d against torch:
forward and input gradient (float64 to 1e-10, float32 to 1e-4), parameter gradients of
BatchNorm, each factor's adjoint test and JVP against torch.func.jvp, and the errors."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch", reason="the pooling layers are checked against torch")
nn = torch.nn

TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _bn(cls, C, rng, affine=True):
    m = cls(C, affine=affine).double().eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor(rng.standard_normal(C)))
        m.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, C)))
        if affine:
            m.weight.copy_(torch.tensor(rng.standard_normal(C)))
            m.bias.copy_(torch.tensor(rng.standard_normal(C)))
    t = lambda p: None if p is None else p.detach().numpy().copy()
    mine = getattr(jg.layers, cls.__name__)(t(m.weight), t(m.bias), t(m.running_mean), t(m.running_var), eps=m.eps)
    return m, mine


# (name, torch module maker, jacgrad layer maker, input shape): one row per case
CASES = [
    ("avg2", lambda: nn.AvgPool2d(2), lambda: jg.layers.AvgPool2d(2), (2, 3, 6, 7)),
    ("avg3s2p1", lambda: nn.AvgPool2d(3, 2, 1), lambda: jg.layers.AvgPool2d(3, 2, 1), (2, 2, 7, 6)),
    ("avg2s3", lambda: nn.AvgPool2d(2, 3), lambda: jg.layers.AvgPool2d(2, 3), (1, 2, 8, 8)),     # stride > kernel, B = 1
    ("max2", lambda: nn.MaxPool2d(2), lambda: jg.layers.MaxPool2d(2), (2, 3, 6, 7)),
    ("max3s1p1", lambda: nn.MaxPool2d(3, 1, 1), lambda: jg.layers.MaxPool2d(3, 1, 1), (2, 2, 5, 6)),  # overlapping
    ("max2d2", lambda: nn.MaxPool2d(2, 2, 0, 2), lambda: jg.layers.MaxPool2d(2, 2, 0, 2), (2, 2, 7, 7)),  # dilation
    ("max2s3", lambda: nn.MaxPool2d((2, 3), 3), lambda: jg.layers.MaxPool2d((2, 3), 3), (1, 2, 8, 9)),
    ("gap", lambda: nn.AdaptiveAvgPool2d(1), lambda: jg.layers.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    ("flatten", lambda: nn.Flatten(), lambda: jg.layers.Flatten(), (2, 3, 2, 4)),
]


def _close(a, b, dtype):
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float(np.abs(np.asarray(a, np.float64) - b).max()) <= TOL[dtype] * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,tm,jm,shape", CASES, ids=[c[0] for c in CASES])
def test_forward_and_input_gradient_match_torch(name, tm, jm, shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = tm()(xt)
    L = jm()
    y, state = L.forward(x)
    _close(y, yt.detach().numpy(), dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.tensor(g))
    gin, _ = L.backward(state, g, [])
    _close(gin, xt.grad.numpy(), dtype)
    assert y.dtype == dtype and gin.dtype == dtype


@pytest.mark.parametrize("name,tm,jm,shape", CASES, ids=[c[0] for c in CASES])
def test_factor_adjoint_and_jvp(name, tm, jm, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    L = jm()
    _, state = L.forward(x)
    J = L.factor(state)
    B = shape[0]
    u, v = rng.standard_normal((B, J.h_in)), rng.standard_normal((B, J.h_out))
    lhs, rhs = float(np.sum(v * J.jvp(u))), float(np.sum(J.vjp(v) * u))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    _, jt = torch.func.jvp(tm(), (torch.tensor(x),), (torch.tensor(u.reshape(shape)),))
    _close(J.jvp(u), jt.numpy().reshape(B, -1), np.float64)
    stack = rng.standard_normal((B, 2, J.h_out))
    _close(J.vjp_stack(stack)[:, 1], J.vjp(np.ascontiguousarray(stack[:, 1])), np.float64)
    dense = J.dense() if J.per_sample else np.broadcast_to(J.dense(), (B, J.h_out, J.h_in))
    top = np.linalg.svd(dense, compute_uv=False)[:, 0]
    np.testing.assert_allclose(J.spectral_norm(), top if J.per_sample else top[0], rtol=1e-9)
    assert np.all(J.norm_bound() >= top * (1 - 1e-12))


def test_maxpool_ties_take_the_first_maximum_as_torch():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = 1.0                      # a tie in the first window
    xt = torch.tensor(x, requires_grad=True)
    nn.MaxPool2d(2)(xt).sum().backward()
    L = jg.layers.MaxPool2d(2)
    _, state = L.forward(x)
    np.testing.assert_array_equal(L.backward(state, np.ones((1, 1, 2, 2)), [])[0], xt.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm2d, (2, 3, 4, 5)), (nn.BatchNorm1d, (3, 4)), (nn.BatchNorm1d, (2, 4, 6))])
def test_eval_batchnorm_matches_torch(cls, shape, dtype):
    rng = np.random.default_rng(2)
    m, L = _bn(cls, shape[1], rng)
    if dtype == np.float32:
        m = m.float()
        L = type(L)(*(a.astype(dtype) for a in (L.weight, L.bias, L.running_mean, L.running_var)), eps=L.eps)
    x = rng.standard_normal(shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = m(xt)
    y, state = L.forward(x)
    _close(y, yt.detach().numpy(), dtype)
    g = rng.standard_normal(shape).astype(dtype)
    yt.backward(torch.tensor(g))
    grads = [np.empty_like(L.weight), np.empty_like(L.bias)]
    sq = np.zeros(shape[0], dtype=dtype)
    gin, _ = L.backward(state, g, grads, sq=sq)
    _close(gin, xt.grad.numpy(), dtype)
    _close(grads[0], m.weight.grad.numpy(), dtype)
    _close(grads[1], m.bias.grad.numpy(), dtype)
    J = L.factor(state)
    u, v = rng.standard_normal((shape[0], J.h_in)), rng.standard_normal((shape[0], J.h_out))
    assert abs(np.sum(v * J.jvp(u)) - np.sum(J.vjp(v) * u)) <= 1e-4 * np.abs(v).sum()
    if dtype == np.float64:   # per-sample norms of (∂γ, ∂β) against torch.func vmap(grad)
        params = {k: p.detach() for k, p in m.named_parameters()}
        buffers = {k: b for k, b in m.named_buffers()}
        f = lambda p, xi, gi: (torch.func.functional_call(m, (p, buffers), (xi[None],))[0] * gi).sum()
        per = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, torch.tensor(x), torch.tensor(g))
        ref = sum((t.reshape(shape[0], -1) ** 2).sum(1) for t in per.values()).numpy()
        np.testing.assert_allclose(sq, ref, rtol=1e-10)


def test_batchnorm_without_affine_and_errors():
    rng = np.random.default_rng(3)
    m, L = _bn(nn.BatchNorm2d, 3, rng, affine=False)
    x = rng.standard_normal((2, 3, 2, 2))
    assert L.params == [] and L.names == ()
    np.testing.assert_allclose(L.forward(x)[0], m(torch.tensor(x)).detach().numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"BatchNorm2d: input of shape \(2, 4, 2, 2\) is not \(B, C, H, W\) with C = 3"):
        L.forward(np.ones((2, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"BatchNorm1d: input of shape \(2, 3, 2, 2\) is not \(B, C\) or \(B, C, L\)"):
        jg.layers.BatchNorm1d(None, None, np.zeros(3), np.ones(3)).forward(x)


def test_pool_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"MaxPool2d: the input's spatial size 2×2.*smaller than the kernel's span 3×3"):
        jg.layers.MaxPool2d(3).forward(np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"AvgPool2d: input of shape \(4, 4\) has 2 axes"):
        jg.layers.AvgPool2d(2).forward(np.ones((4, 4)))
    with pytest.raises(ValueError, match="AdaptiveAvgPool2d: only output_size=1"):
        jg.layers.AdaptiveAvgPool2d(2)
    with pytest.raises(ValueError, match="padding .* at most half the kernel"):
        jg.layers.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="Flatten: only start_dim=1"):
        jg.layers.Flatten(start_dim=2)
    L = jg.layers.MaxPool2d(2, in_shape=(3, 8, 6))
    assert L.out_shape == (3, 4, 3) and L.forward_shapes(5) == [(5, 3, 4, 3)] and L.n_in == 144


@pytest.mark.parametrize("act,tact", [("relu", torch.relu), ("gelu", torch.nn.functional.gelu)])
def test_batchnorm_with_a_fused_activation(act, tact):
    """BatchNorm2d(activation=...) is torch's BatchNorm2d then the activation: output, gradients,
    the per-sample factor diag(φ')·diag(γ/σ) (adjoint test, JVP against torch.func.jvp)."""
    rng = np.random.default_rng(4)
    m, L0 = _bn(nn.BatchNorm2d, 3, rng)
    L = jg.layers.BatchNorm2d(L0.weight, L0.bias, L0.running_mean, L0.running_var, eps=L0.eps, activation=act)
    f = lambda xt: tact(m(xt))
    x = rng.standard_normal((2, 3, 4, 4))
    xt = torch.tensor(x, requires_grad=True)
    yt = f(xt)
    y, state = L.forward(x)
    _close(y, yt.detach().numpy(), np.float64)
    g = rng.standard_normal(x.shape)
    yt.backward(torch.tensor(g))
    grads = [np.empty(3), np.empty(3)]
    gin, _ = L.backward(state, g, grads)
    _close(gin, xt.grad.numpy(), np.float64)
    _close(grads[0], m.weight.grad.numpy(), np.float64)
    _close(grads[1], m.bias.grad.numpy(), np.float64)
    J = L.factor(state)
    assert J.per_sample
    u, v = rng.standard_normal((2, 48)), rng.standard_normal((2, 48))
    assert abs(np.sum(v * J.jvp(u)) - np.sum(J.vjp(v) * u)) <= 1e-12 * np.abs(v).sum()
    _, jt = torch.func.jvp(f, (torch.tensor(x),), (torch.tensor(u.reshape(x.shape)),))
    _close(J.jvp(u), jt.detach().numpy().reshape(2, -1), np.float64)
