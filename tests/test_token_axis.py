"""The token axis: Dense, LayerNorm, RMSNorm, activations and Residual on ``(B, T, d)`` inputs,
and every parameter-space product on them, against torch.func (``vmap(grad)``, ``vmap(jacrev)``)
on the same torch model (``Sequential.to_torch``) in float64; T = 1 given as ``(B, 1, d)`` is
bitwise the ``(B, d)`` path; bad inputs get clear errors."""

import numpy as np
import pytest

import jacgrad as jg

L = jg.layers


def _net(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)  # noqa: E731
    v = lambda n: rng.standard_normal(n) * 0.3  # noqa: E731
    return jg.Sequential([
        L.Dense(W(3, 5), v(5), "tanh"),
        L.Residual([L.LayerNorm(1 + v(5), v(5)), L.Dense(W(5, 5), v(5), "gelu")], scale=0.7),
        L.RMSNorm(1 + v(5), eps=1e-6),
        L.Dense(W(5, 4), v(4), "silu"),
        L.LayerNorm(1 + v(4), v(4)),
        L.Dense(W(4, 2), v(2)),
    ])


def _data(B=3, T=4, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, 3)), rng.standard_normal((B, T, 2))


# ---------------------------------------------------------------------------- torch.func references
@pytest.fixture(scope="module")
def ref():
    torch = pytest.importorskip("torch")
    tf = torch.func
    net = _net()
    module = net.to_torch().double()
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    # jacgrad's flat order is the torch order, with a Linear weight transposed (W = weight.T)
    tps = [len(s) == 2 for s in shapes]

    def unflat(theta):
        out, at = {}, 0
        for n, s, tp in zip(names, shapes, tps):
            k = int(np.prod(s))
            piece = theta[at:at + k]
            out[n] = piece.reshape(s[::-1]).T if tp else piece.reshape(s)
            at += k
        return out

    theta = torch.tensor(np.concatenate([np.ravel(p) for _, p in L.named_params(net.layers)]))

    def f(th, x):  # one sample (T, d) -> (T, n_out)
        return tf.functional_call(module, unflat(th), (x[None],))[0]

    def loss(th, x, t):
        return ((f(th, x) - t) ** 2).mean()

    x, t = _data()
    X, Tt = torch.tensor(x), torch.tensor(t)
    g = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0))(theta, X, Tt).numpy()
    J = tf.vmap(tf.jacrev(f), in_dims=(None, 0))(theta, X).reshape(x.shape[0], -1, theta.numel()).numpy()
    x2 = np.random.default_rng(5).standard_normal((2, 4, 3))
    J2 = tf.vmap(tf.jacrev(f), in_dims=(None, 0))(theta, torch.tensor(x2)).reshape(2, -1, theta.numel()).numpy()
    return dict(net=net, x=x, t=t, g=g, J=J, x2=x2, J2=J2)


def _close(a, b, tol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


def test_per_sample_grads(ref):
    _close(ref["net"].per_sample_grads(ref["x"], ref["t"]).flat, ref["g"])


@pytest.mark.parametrize("method", ["auto", "gram", "instantiate"])
def test_per_sample_grad_norms_every_method(ref, method):
    _close(ref["net"].per_sample_grad_norms(ref["x"], ref["t"], method=method), np.linalg.norm(ref["g"], axis=1))


def test_per_layer_norms(ref):
    net, g = ref["net"], ref["g"]
    sizes = [sum(int(np.prod(p.shape)) for p in Lr.params) for Lr in net.layers]
    cuts = np.cumsum([0] + sizes)
    want = np.stack([np.linalg.norm(g[:, a:b], axis=1) for a, b in zip(cuts[:-1], cuts[1:])], axis=1)
    for method in ("gram", "instantiate"):
        _close(net.per_sample_grad_norms(ref["x"], ref["t"], per_layer=True, method=method), want)


def test_ntk_full_trace_and_x2(ref):
    net, J, J2 = ref["net"], ref["J"], ref["J2"]
    K = np.einsum("iop,jqp->ijoq", J, J)
    _close(jg.ntk(net, ref["x"]), K)
    _close(jg.ntk(net, ref["x"], trace=True), np.einsum("ijoo->ij", K))
    _close(jg.ntk(net, ref["x"], ref["x2"]), np.einsum("iop,jqp->ijoq", J, J2))
    _close(jg.ntk(net, ref["x"], ref["x2"], trace=True), np.einsum("iop,jop->ij", J, J2))


def test_ggn_vp_and_diagonal(ref):
    net, J = ref["net"], ref["J"]
    B, O, P = J.shape
    G = np.einsum("iop,ioq->pq", J, J) * (2.0 / O) / B  # mse over the T·d outputs: H_i = 2/O · I
    v = np.random.default_rng(3).standard_normal(P)
    _close(net.ggn_vp(ref["x"], v, ref["t"]), G @ v)
    _close(net.ggn_diagonal(ref["x"], ref["t"]).flat, np.diag(G))


def test_clipped_grad(ref):
    net, g = ref["net"], ref["g"]
    C = 0.5 * np.median(np.linalg.norm(g, axis=1))
    c = np.minimum(1.0, C / np.linalg.norm(g, axis=1))
    r = net.clipped_grad(ref["x"], ref["t"], max_norm=C)
    _close(r.flat, (c[:, None] * g).sum(axis=0) / g.shape[0])
    _close(r.norms, np.linalg.norm(g, axis=1))


def test_loss_and_grads_is_the_mean_of_per_sample_grads(ref):
    net = ref["net"]
    _, grads = net.loss_and_grads(ref["x"], ref["t"])
    _close(grads.flat, ref["g"].mean(axis=0))
    assert grads.input.shape == ref["x"].shape


# ---------------------------------------------------------------------------- T = 1 is the (B, d) path
def test_one_token_is_bitwise_the_flat_path():
    net = _net(seed=2)
    x, t = _data(B=5, T=1, seed=3)
    x2, t2 = x[:, 0], t[:, 0]
    same = lambda a, b: np.array_equal(np.asarray(a).reshape(np.shape(b)), b)  # noqa: E731
    assert same(net(x), net(x2))
    assert same(net.loss_and_grads(x, t)[1].flat, net.loss_and_grads(x2, t2)[1].flat)
    for method in ("auto", "gram", "instantiate"):
        assert same(net.per_sample_grad_norms(x, t, method=method), net.per_sample_grad_norms(x2, t2))
    assert same(net.per_sample_grads(x, t).flat, net.per_sample_grads(x2, t2).flat)
    assert same(jg.ntk(net, x, trace=True), jg.ntk(net, x2, trace=True))
    v = np.random.default_rng(0).standard_normal(net.n_params)
    assert same(net.ggn_vp(x, v, t), net.ggn_vp(x2, v, t2))
    assert same(net.ggn_diagonal(x, t).flat, net.ggn_diagonal(x2, t2).flat)
    assert same(net.clipped_grad(x, t, max_norm=0.1).flat, net.clipped_grad(x2, t2, max_norm=0.1).flat)


def test_token_factor_vjp_jvp_adjoint():
    net = _net(seed=4)
    x, _ = _data()
    chain = net.jacobian_chain(net.forward(x)[1])
    rng = np.random.default_rng(1)
    factors = [F for J in chain.factors for F in (J.inner.factors if hasattr(J, "inner") and hasattr(J.inner, "factors")
                                                   else [J])]
    assert len(factors) == 7
    for J in factors:
        u = rng.standard_normal(x.shape[:2] + (J.h_in,))
        v = rng.standard_normal(x.shape[:2] + (J.h_out,))
        assert abs(np.vdot(v, J.jvp(u)) - np.vdot(J.vjp(v), u)) < 1e-10 * np.linalg.norm(u) * np.linalg.norm(v)


# ---------------------------------------------------------------------------- errors
def test_wrong_token_width_is_refused():
    net = _net()
    with pytest.raises(ValueError, match=r"layer 0 expects 3 features.*\(2, 4, 7\).*per token, \(B, T, 3\)"):
        net.forward(np.ones((2, 4, 7)))


def test_four_dimensional_input_is_refused():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 3\)"):
        _net().forward(np.ones((2, 3, 4, 3)))
    with pytest.raises(ValueError, match=r"Dense: the input has shape \(2, 3, 4, 3\).*\(B, T, 3\)"):
        L.Dense(np.ones((3, 2))).forward(np.ones((2, 3, 4, 3)))


def test_unknown_method_is_refused():
    x, t = _data()
    with pytest.raises(ValueError, match=r"method='ghost'.*auto, gram, instantiate"):
        _net().per_sample_grad_norms(x, t, method="ghost")


def test_dense_jacobian_of_a_token_batch_over_max_memory_is_refused_clearly():
    net = _net()
    x, _ = _data()
    B, T = x.shape[:2]
    with pytest.raises(ValueError, match=rf"jacobian: the per-sample Jacobians of this token batch \(B={B}, T={T}, "
                                         r".* over max_memory=10 bytes"):
        net.jacobian(x, max_memory=10)
    assert net.jacobian(x).shape == (B, T * net.n_out, T * net.n_in)  # tests/test_token_jacobian.py: the numbers


def test_chunks_under_max_memory_give_the_same_numbers(ref):
    net, x, t = ref["net"], ref["x"], ref["t"]
    _close(jg.ntk(net, x, ref["x2"], max_memory=1), jg.ntk(net, x, ref["x2"], max_memory=None))
    _close(jg.ntk(net, x, trace=True, max_memory=1), jg.ntk(net, x, trace=True, max_memory=None))
    _close(net.ggn_diagonal(x, t, max_memory=1).flat, net.ggn_diagonal(x, t, max_memory=None).flat)


def test_float32_token_batch_against_torch_func(ref):
    net64, x, t = ref["net"], ref["x"], ref["t"]
    net = jg.Sequential.from_torch(net64.to_torch().float())
    g = ref["g"]
    x32, t32 = x.astype(np.float32), t.astype(np.float32)
    for method in ("gram", "instantiate"):
        _close(net.per_sample_grad_norms(x32, t32, method=method), np.linalg.norm(g, axis=1), tol=1e-4)
    _close(net.per_sample_grads(x32, t32).flat, g, tol=1e-4)
    _close(jg.ntk(net, x32, trace=True), np.einsum("iop,jop->ij", ref["J"], ref["J"]), tol=1e-4)
