"""Parameter-space products against float64 torch.func references built from the parameters:
per-sample gradients (vmap(grad)), their norms, the empirical NTK (jacrev J_θ J_θᵀ), the
Gauss–Newton product (dense G = mean_i J_iᵀ H_i J_i with H_i from torch.func.hessian, and
torch.func jvp → H → vjp) and its diagonal. Every activation × every loss × float32/float64,
plus B=1, width 1 and an 8-wide bottleneck. Skipped where torch is not importable."""

import zlib

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import relative_error

torch = pytest.importorskip("torch")
F = torch.nn.functional
tf = torch.func

pytestmark = pytest.mark.torch

from test_mlp_torch import TORCH_ACT  # noqa: E402 - the one table of torch activations (tests/ is on sys.path)

LOSSES = ["mse", "softmax_cross_entropy", "sigmoid_bce"]
TOL = {np.float64: 1e-10, np.float32: 2e-4}
SHAPES = {  # name: (sizes, B)
    "small": ([3, 5, 4, 3], 4),
    "B1": ([3, 6, 2], 1),
    "width1": ([1, 1, 1, 1], 3),
    "bottleneck": ([12, 16, 8, 16, 3], 5),
    "bottleneck_scalar": ([12, 16, 8, 16, 1], 5),  # BackPACK's BCEWithLogitsLoss takes one output only
}


def test_the_torch_table_covers_every_activation():
    assert sorted(TORCH_ACT) == sorted(jg.activations.names())


def make_case(activation, loss, dtype, shape="small", seed_extra=""):
    sizes, B = SHAPES[shape]
    rng = np.random.default_rng(zlib.crc32(f"{activation}-{loss}-{shape}-{seed_extra}".encode()))
    net = jg.MLP.init(sizes, activation=activation, bias_std=0.3, seed=int(rng.integers(1 << 30)), dtype=dtype)
    x = rng.standard_normal((B, sizes[0])).astype(dtype)
    C = sizes[-1]
    if loss == "softmax_cross_entropy":
        t = rng.integers(0, C, size=B)
    elif loss == "sigmoid_bce":
        t = rng.uniform(0, 1, size=(B, C)).astype(dtype)
    else:
        t = rng.standard_normal((B, C)).astype(dtype)
    return net, x, t


def torch_params(net):
    """The parameters as one float64 vector in Gradients.flat order."""
    return torch.tensor(np.concatenate([np.concatenate([W.ravel(), b]) for W, b in zip(net.weights, net.biases)]).astype(np.float64))


def torch_f(net):
    """``f(theta, x)``: the network as a function of the flat float64 parameter vector."""
    shapes = [W.shape for W in net.weights]

    def f(theta, x):
        z, at = x, 0
        for (n_in, n_out), act in zip(shapes, net.activations):
            W = theta[at : at + n_in * n_out].reshape(n_in, n_out)
            at += n_in * n_out
            b = theta[at : at + n_out]
            at += n_out
            z = TORCH_ACT[act](z @ W + b)
        return z

    return f


def torch_target(t, C):
    """float64 targets; integer labels as one-hot rows."""
    if t.dtype.kind == "i":
        return F.one_hot(torch.tensor(t), C).double()
    return torch.tensor(t.astype(np.float64))


def torch_loss_i(loss):
    """Sample i's own loss ``ℓ_i(y_i, t_i)`` for one output row ``y_i: (C,)``."""
    def ell(y, t):
        if loss == "mse":
            return ((y - t) ** 2).mean()
        if loss == "softmax_cross_entropy":
            return -(t * torch.log_softmax(y, 0)).sum()  # t: a one-hot or probability row
        return F.binary_cross_entropy_with_logits(y, t)

    return ell


def reference(net, x, t, loss):
    """float64: per-sample grads (B, P), J_θ (B, C, P), loss Hessians (B, C, C), dense G (P, P)."""
    theta, f, ell = torch_params(net), torch_f(net), torch_loss_i(loss)
    X = torch.tensor(x.astype(np.float64))
    T = torch_target(t, net.sizes[-1])
    psg = tf.vmap(tf.grad(lambda th, xi, ti: ell(f(th, xi[None])[0], ti)), in_dims=(None, 0, 0))(theta, X, T)
    J = tf.jacrev(f)(theta, X)  # (B, C, P)
    Y = f(theta, X).detach()
    H = tf.vmap(tf.hessian(ell), in_dims=(0, 0))(Y, T)  # (B, C, C)
    G = torch.einsum("bcp,bcd,bdq->pq", J, H, J) / X.shape[0]
    return psg.numpy(), J.numpy(), H.numpy(), G.numpy(), (theta, f, ell, X, T)


def all_cases():
    for act in sorted(TORCH_ACT):
        for loss in LOSSES:
            yield act, loss, "small"
    for shape in ("B1", "width1", "bottleneck"):
        for act in ("tanh", "relu", "gelu"):
            for loss in LOSSES:
                yield act, loss, shape


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation,loss,shape", list(all_cases()))
def test_parameter_space_products_match_torch_func(activation, loss, shape, dtype):
    net, x, t = make_case(activation, loss, dtype, shape)
    psg, J, H, G, (theta, f, ell, X, T) = reference(net, x, t, loss)
    tol = TOL[dtype]
    B = x.shape[0]

    g = net.per_sample_grads(x, t, loss=loss)
    assert g.flat.shape == psg.shape and g.flat.dtype == dtype
    assert relative_error(g.flat, psg) <= tol
    for j, (W, b) in enumerate(zip(net.weights, net.biases)):
        assert g.weights[j].shape == (B,) + W.shape and g.biases[j].shape == (B,) + b.shape
        assert np.shares_memory(g.weights[j], g.flat) and np.shares_memory(g.biases[j], g.flat)
    # the batch gradient is the mean of the per-sample ones
    _, gb = net.loss_and_grads(x, t, loss=loss)
    assert relative_error(g.flat.mean(axis=0), gb.flat) <= tol

    norms = net.per_sample_grad_norms(x, t, loss=loss)
    assert norms.shape == (B,) and norms.dtype == dtype
    assert relative_error(norms, np.linalg.norm(psg, axis=1)) <= tol
    per_layer = net.per_sample_grad_norms(x, t, loss=loss, per_layer=True)
    sizes = [W.size + W.shape[1] for W in net.weights]
    edges = np.cumsum([0] + sizes)
    want = np.stack([np.linalg.norm(psg[:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    assert per_layer.shape == (B, net.depth) and relative_error(per_layer, want) <= tol

    K = jg.ntk(net, x)
    K_ref = np.einsum("ncp,mdp->nmcd", J, J)
    assert K.shape == K_ref.shape and K.dtype == dtype and relative_error(K, K_ref) <= tol
    assert relative_error(jg.ntk(net, x, trace=True), np.einsum("nmcc->nm", K_ref)) <= tol

    rng = np.random.default_rng(7)
    v = rng.standard_normal(theta.shape[0])
    Gv = net.ggn_vp(x, v.astype(dtype), target=t, loss=loss)
    assert Gv.shape == v.shape and Gv.dtype == dtype
    assert relative_error(Gv, G @ v) <= tol * 10
    # matrix-free torch.func: jvp of the network, the loss Hessian per sample, vjp
    vt = torch.tensor(v)
    Y, JV = tf.jvp(lambda th: f(th, X), (theta,), (vt,))
    HJv = torch.einsum("bcd,bd->bc", torch.tensor(H), JV) / B
    _, vjp = tf.vjp(lambda th: f(th, X), theta)
    assert relative_error(Gv, vjp(HJv)[0].numpy()) <= tol * 10
    assert relative_error(net.ggn_vp(x, v.astype(dtype), loss=loss), Gv) <= 1e-12  # the target does not matter

    D = net.ggn_diagonal(x, target=t, loss=loss)
    assert D.flat.shape == v.shape and D.flat.dtype == dtype
    assert relative_error(D.flat, np.diag(G)) <= tol * 10
    assert relative_error(net.ggn_diagonal(x, loss=loss, max_memory=1).flat, D.flat) <= 1e-5  # one sample per chunk


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_ntk_of_two_inputs_and_in_chunks(dtype):
    net, x, _ = make_case("tanh", "mse", dtype, "bottleneck")
    rng = np.random.default_rng(3)
    x2 = rng.standard_normal((7, x.shape[1])).astype(dtype)
    f, theta = torch_f(net), torch_params(net)
    J1 = tf.jacrev(f)(theta, torch.tensor(x.astype(np.float64))).numpy()
    J2 = tf.jacrev(f)(theta, torch.tensor(x2.astype(np.float64))).numpy()
    K_ref = np.einsum("ncp,mdp->nmcd", J1, J2)
    tol = TOL[dtype]
    for budget in (None, 1, 20_000):
        assert relative_error(jg.ntk(net, x, x2, max_memory=budget), K_ref) <= tol
        assert relative_error(jg.ntk(net, x, x2, trace=True, max_memory=budget), np.einsum("nmcc->nm", K_ref)) <= tol
        K11 = np.einsum("ncp,mdp->nmcd", J1, J1)
        assert relative_error(jg.ntk(net, x, max_memory=budget), K11) <= tol
        assert relative_error(jg.ntk(net, x, trace=True, max_memory=budget), np.einsum("nmcc->nm", K11)) <= tol


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_loss_hessians_are_exact_and_finite_at_large_outputs(loss, dtype):
    y = np.array([[1e4, -1e4, 0.0], [3.0, -2.0, 0.5], [-1e4, -1e4, -1e4], [0.0, 0.0, 0.0]], dtype=dtype)
    ell = torch_loss_i(loss)
    t = np.array([0, 1, 2, 1]) if loss == "softmax_cross_entropy" else np.full(y.shape, 0.3, dtype=dtype)
    T = torch_target(t, y.shape[1])
    H = tf.vmap(tf.hessian(ell))(torch.tensor(y.astype(np.float64)), T).numpy()
    u = np.random.default_rng(0).standard_normal(y.shape).astype(dtype)
    Hu = jg.loss_hessians.hessian_vp(loss, y, u, t)
    assert np.isfinite(Hu).all() and Hu.dtype == dtype
    assert relative_error(Hu, np.einsum("bcd,bd->bc", H, u)) <= TOL[dtype]
    V = jg.loss_hessians.hessian_factor(loss, y, t)
    assert np.isfinite(V).all() and V.dtype == dtype
    assert relative_error(np.einsum("brc,brd->bcd", V, V), H) <= TOL[dtype]


def test_softmax_rows_that_do_not_sum_to_one_scale_the_hessian():
    y = np.array([[0.3, -1.0, 2.0]])
    T = np.array([[0.5, 1.0, 0.25]])
    H = tf.hessian(lambda z: -(torch.tensor(T[0]) * torch.log_softmax(z, 0)).sum())(torch.tensor(y[0])).numpy()
    u = np.array([[1.0, -2.0, 0.5]])
    assert relative_error(jg.loss_hessians.hessian_vp("softmax_cross_entropy", y, u, T)[0], H @ u[0]) <= 1e-12
    V = jg.loss_hessians.hessian_factor("softmax_cross_entropy", y, T)[0]
    assert relative_error(V.T @ V, H) <= 1e-12


# ---------------------------------------------------------------- BackPACK
BACKPACK_ACT = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
BACKPACK_LOSS = {"mse": torch.nn.MSELoss, "softmax_cross_entropy": torch.nn.CrossEntropyLoss,
                 "sigmoid_bce": torch.nn.BCEWithLogitsLoss}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", sorted(BACKPACK_ACT))
def test_against_backpack_batchgrad_batchl2_and_diagggn(activation, loss):
    pytest.importorskip("backpack")  # here, not at module level: that would skip every test above
    from backpack import backpack as bp_context, extend
    from backpack.extensions import BatchGrad, BatchL2Grad, DiagGGNExact

    shape = "bottleneck_scalar" if loss == "sigmoid_bce" else "bottleneck"
    net, x, t = make_case(activation, loss, np.float64, shape, seed_extra="backpack")
    layers = []
    for W, b, act in zip(net.weights, net.biases, net.activations):
        lin = torch.nn.Linear(*W.shape).double()
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(W.T))
            lin.bias.copy_(torch.tensor(b))
        layers += [lin, BACKPACK_ACT[act]() if act != "identity" else torch.nn.Identity()]
    model = extend(torch.nn.Sequential(*[m for m in layers if not isinstance(m, torch.nn.Identity)]))
    lossfn = extend(BACKPACK_LOSS[loss]())
    T = torch.tensor(t) if loss == "softmax_cross_entropy" else torch.tensor(t.astype(np.float64))
    with bp_context(BatchGrad(), BatchL2Grad(), DiagGGNExact()):
        lossfn(model(torch.tensor(x)), T).backward()
    B = x.shape[0]
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    g = net.per_sample_grads(x, t, loss=loss)
    n = net.per_sample_grad_norms(x, t, loss=loss, per_layer=True)
    D = net.ggn_diagonal(x, t, loss=loss)
    for j, lin in enumerate(lins):
        # BatchGrad differentiates ℓ_i / B: ours is B times it
        assert relative_error(g.weights[j], B * lin.weight.grad_batch.numpy().transpose(0, 2, 1)) <= 1e-10
        assert relative_error(g.biases[j], B * lin.bias.grad_batch.numpy()) <= 1e-10
        l2 = lin.weight.batch_l2.numpy() + lin.bias.batch_l2.numpy()
        assert relative_error(n[:, j] ** 2, B * B * l2) <= 1e-10
        assert relative_error(D.weights[j], lin.weight.diag_ggn_exact.numpy().T) <= 1e-10
        assert relative_error(D.biases[j], lin.bias.diag_ggn_exact.numpy()) <= 1e-10


# ---------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    net, x, t = make_case("tanh", "mse", np.float64, "small")
    P = sum(W.size + W.shape[1] for W in net.weights)
    with pytest.raises(ValueError, match="target has shape"):
        net.per_sample_grad_norms(x, t[:, :2])
    with pytest.raises(ValueError, match="target has shape"):
        net.per_sample_grads(x, t[:2])
    with pytest.raises(ValueError, match="target has shape"):
        net.ggn_vp(x, np.zeros(P), target=t[:, :1])
    with pytest.raises(ValueError, match="target has shape"):
        net.ggn_diagonal(x, target=t[:1])
    with pytest.raises(ValueError, match="valid names"):
        net.ggn_diagonal(x, loss="hinge")
    with pytest.raises(ValueError, match="valid names"):
        net.ggn_vp(x, np.zeros(P), loss="hinge")
    with pytest.raises(ValueError, match=rf"v has shape \({P - 1},\).*P={P}"):
        net.ggn_vp(x, np.zeros(P - 1))
    with pytest.raises(ValueError, match="v has shape"):
        net.ggn_vp(x, np.zeros((1, P)))
    with pytest.raises(TypeError, match="dtype int64"):
        net.ggn_vp(x, np.zeros(P, dtype=np.int64))
    with pytest.raises(ValueError, match=r"per_sample_grads of B=4 samples x P=.*max_memory.*per_sample_grad_norms"):
        net.per_sample_grads(x, t, max_memory=100)
    with pytest.raises(TypeError, match="needs a jacgrad network"):
        jg.ntk(lambda x: x, x)
    with pytest.raises(ValueError, match="x2 has shape"):
        jg.ntk(net, x, x[:, :2])
    with pytest.raises(ValueError, match="layer 0 expects 3 features"):
        net.per_sample_grad_norms(x[:, :2], t)


def test_per_sample_grads_within_the_budget_and_unbounded():
    net, x, t = make_case("tanh", "mse", np.float32, "small")
    P = sum(W.size + W.shape[1] for W in net.weights)
    exact = x.shape[0] * P * 4
    a = net.per_sample_grads(x, t, max_memory=exact).flat
    b = net.per_sample_grads(x, t, max_memory=None).flat
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=f"{exact} bytes"):
        net.per_sample_grads(x, t, max_memory=exact - 1)


def test_results_leave_the_network_and_inputs_unchanged():
    net, x, t = make_case("gelu", "sigmoid_bce", np.float64, "small")
    before = [W.copy() for W in net.weights] + [b.copy() for b in net.biases]
    x0, t0 = x.copy(), t.copy()
    v = np.ones(sum(W.size + W.shape[1] for W in net.weights))
    net.per_sample_grads(x, t, loss="sigmoid_bce")
    net.per_sample_grad_norms(x, t, loss="sigmoid_bce")
    net.ggn_vp(x, v, loss="sigmoid_bce")
    net.ggn_diagonal(x, loss="sigmoid_bce")
    jg.ntk(net, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, net.weights + net.biases))
    assert np.array_equal(x, x0) and np.array_equal(t, t0) and bool((v == 1.0).all())


# ---------------------------------------------------------------- GPU: same code path, float64 NumPy reference
@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_gpu_matches_numpy(loss):
    cp = pytest.importorskip("cupy")
    net, x, t = make_case("gelu", loss, np.float64, "bottleneck")
    gnet = net.to("gpu")
    gx, gt = cp.asarray(x), cp.asarray(t)
    v = np.random.default_rng(1).standard_normal(sum(W.size + W.shape[1] for W in net.weights))
    pairs = [
        (gnet.per_sample_grads(gx, gt, loss=loss).flat, net.per_sample_grads(x, t, loss=loss).flat),
        (gnet.per_sample_grad_norms(gx, gt, loss=loss), net.per_sample_grad_norms(x, t, loss=loss)),
        (jg.ntk(gnet, gx), jg.ntk(net, x)),
        (gnet.ggn_vp(gx, cp.asarray(v), loss=loss), net.ggn_vp(x, v, loss=loss)),
        (gnet.ggn_diagonal(gx, loss=loss).flat, net.ggn_diagonal(x, loss=loss).flat),
    ]
    for got, want in pairs:
        assert isinstance(got, cp.ndarray)
        assert relative_error(got, want) <= 1e-10
    with pytest.raises(TypeError, match="another device"):
        gnet.ggn_vp(gx, v, loss=loss)


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_is_symmetric_positive_semidefinite_and_its_diagonal_agrees_with_ggn_vp(loss):
    """No dense reference at this size: G's own identities <u, Gv> = <Gu, v>, <v, Gv> >= 0, and
    (G e_k)_k = diag(G)_k for unit vectors e_k."""
    rng = np.random.default_rng(11)
    net = jg.MLP.init([20, 30, 30, 5], activation="silu", bias_std=0.2, seed=4)
    x = rng.standard_normal((16, 20))
    P = sum(W.size + W.shape[1] for W in net.weights)
    u, v = rng.standard_normal(P), rng.standard_normal(P)
    Gu, Gv = net.ggn_vp(x, u, loss=loss), net.ggn_vp(x, v, loss=loss)
    assert abs(u @ Gv - Gu @ v) <= 1e-12 * max(abs(u @ Gv), 1e-300) * 10
    assert v @ Gv >= 0 and u @ Gu >= 0
    D = net.ggn_diagonal(x, loss=loss).flat
    for k in rng.choice(P, size=6, replace=False):
        e = np.zeros(P)
        e[k] = 1.0
        assert net.ggn_vp(x, e, loss=loss)[k] == pytest.approx(D[k], rel=1e-10, abs=1e-14)
