"""Sequential's parameter-space products against torch.func on the torch model it was read from
(``Sequential.from_torch``): per-sample gradients (vmap(grad)) and their norms, Gauss–Newton
products (dense float64 G = mean_i J_iᵀ H_i J_i from jacrev and hessian, and the jvp → H → vjp
composition), the GGN diagonal and the empirical NTK (jacrev J_θ J_θᵀ). Nets with residual
blocks holding LayerNorm AND RMSNorm, dense layers with different activations, a norm as the
first and as the last layer, a residual block nested in another; every loss; float64 and float32."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn, tf = torch.nn, torch.func
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.torch

from test_param_space import LOSSES, torch_loss_i, torch_target  # noqa: E402 - the torch losses, once (tests/ is on sys.path)

TARGETS = {"mse": lambda rng, B, C: rng.standard_normal((B, C)),
           "sigmoid_bce": lambda rng, B, C: rng.uniform(0, 1, size=(B, C)),
           "softmax_cross_entropy": lambda rng, B, C: rng.integers(0, C, size=B)}
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, err


def _deep(n=6):
    return nn.Sequential(
        nn.Linear(4, n), nn.Tanh(),
        Residual(nn.Sequential(nn.LayerNorm(n), nn.Linear(n, 8), nn.GELU(), nn.Linear(8, n)), 0.5),
        nn.RMSNorm(n),
        Residual(nn.Sequential(nn.RMSNorm(n), nn.Linear(n, n), nn.Sigmoid()), 1.0),
        nn.Linear(n, n), nn.SiLU(), nn.LayerNorm(n), nn.Linear(n, 3))


def _norm_ends():
    """A norm first and last, and a residual block around a single dense layer."""
    return nn.Sequential(nn.LayerNorm(4), Residual(nn.Sequential(nn.Linear(4, 4), nn.ELU()), 0.7),
                         nn.Linear(4, 3), nn.Softplus(), nn.RMSNorm(3))


def _nested():
    """A residual block inside a residual block, and a block first."""
    inner = Residual(nn.Sequential(nn.RMSNorm(5), nn.Linear(5, 5), nn.ReLU()), 0.3)
    return nn.Sequential(Residual(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)), 1.0), nn.Linear(4, 5), nn.Tanh(),
                         Residual(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), inner, nn.LayerNorm(5)), 0.8),
                         nn.Linear(5, 2))


MODELS = {"deep": _deep, "norm_ends": _norm_ends, "nested": _nested}


def _case(model, loss, dtype, B=5):
    torch.manual_seed(sorted(MODELS).index(model) * 7 + LOSSES.index(loss))
    m = MODELS[model]().double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.add_(0.2 * torch.randn_like(mod.bias))
    m = m.to(torch.float32 if dtype == np.float32 else torch.float64)
    net = jg.Sequential.from_torch(m)
    m = m.double()  # the reference: float64 on the very parameters the net holds
    rng = np.random.default_rng(LOSSES.index(loss))
    x = rng.standard_normal((B, 4)).astype(dtype)
    t = TARGETS[loss](rng, B, net.n_out)
    return m, net, x, (t if t.dtype.kind == "i" else t.astype(dtype))


def _f(m):
    """``f(theta, x)``: the torch model as a function of the flat parameter vector in
    ``BlockGradients.flat`` order (a Linear's W = weight.T, row-major)."""
    params = list(m.named_parameters())

    def f(theta, x):
        at, d = 0, {}
        for name, p in params:
            n = p.numel()
            piece = theta[at:at + n]
            d[name] = piece.reshape(p.shape[1], p.shape[0]).T if p.ndim == 2 else piece
            at += n
        return tf.functional_call(m, d, (x,))

    theta = torch.cat([(p.T if p.ndim == 2 else p).reshape(-1) for _, p in params]).detach()
    return theta, f


def _reference(m, x, t, loss, C):
    theta, f = _f(m)
    ell = torch_loss_i(loss)
    X, T = torch.tensor(x.astype(np.float64)), torch_target(t, C)
    psg = tf.vmap(tf.grad(lambda th, xi, ti: ell(f(th, xi[None])[0], ti)), in_dims=(None, 0, 0))(theta, X, T)
    J = tf.jacrev(f)(theta, X)  # (B, C, P)
    H = tf.vmap(tf.hessian(ell))(f(theta, X).detach(), T)  # (B, C, C)
    G = torch.einsum("bcp,bcd,bdq->pq", J, H, J) / X.shape[0]
    return dict(theta=theta, f=f, ell=ell, X=X, T=T, psg=psg.detach().numpy(), J=J.detach().numpy(),
                G=G.detach().numpy())


CASES = [(m, loss) for m in MODELS for loss in LOSSES]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model,loss", CASES)
def test_products_match_torch_func(model, loss, dtype):
    m, net, x, t = _case(model, loss, dtype)
    ref = _reference(m, x, t, loss, net.n_out)
    tol, B, P = TOL[dtype], x.shape[0], net.n_params
    assert ref["psg"].shape == (B, P)

    g = net.per_sample_grads(x, t, loss=loss)
    assert g.flat.shape == (B, P) and g.flat.dtype == dtype
    _close(g.flat, ref["psg"], tol)
    _, gb = net.loss_and_grads(x, t, loss=loss)  # the same named layout as BlockGradients, per sample
    for got, want in zip(_flat_names(g.layers), _flat_names(gb.layers)):
        assert got[0] == want[0] and got[1].shape == (B,) + want[1].shape
        assert np.shares_memory(got[1], g.flat)
    _close(g.flat.mean(axis=0), gb.flat, tol)

    norms = net.per_sample_grad_norms(x, t, loss=loss)
    assert norms.shape == (B,) and norms.dtype == dtype
    _close(norms, np.linalg.norm(ref["psg"], axis=1), tol)
    per_layer = net.per_sample_grad_norms(x, t, loss=loss, per_layer=True)
    edges = np.cumsum([0] + [sum(p.size for p in L.params) for L in net.layers])
    want = np.stack([np.linalg.norm(ref["psg"][:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    _close(per_layer, want, tol)

    v = np.random.default_rng(1).standard_normal(P).astype(dtype)
    Gv = net.ggn_vp(x, v, target=t, loss=loss)
    assert Gv.shape == (P,) and Gv.dtype == dtype
    _close(Gv, ref["G"] @ v.astype(np.float64), tol)
    # the composition J^T H J v with torch.func's own jvp and vjp
    vt = torch.tensor(v.astype(np.float64))
    y, Jv = tf.jvp(lambda th: ref["f"](th, ref["X"]), (ref["theta"],), (vt,))
    HJv = tf.vmap(lambda yi, ui, ti: tf.jvp(lambda z: tf.grad(ref["ell"])(z, ti), (yi,), (ui,))[1])(y, Jv, ref["T"])
    _, pull = tf.vjp(lambda th: ref["f"](th, ref["X"]), ref["theta"])
    _close(Gv, pull(HJv / B)[0].detach().numpy(), tol)

    D = net.ggn_diagonal(x, target=t, loss=loss)
    assert D.flat.shape == (P,) and D.flat.dtype == dtype
    _close(D.flat, np.diag(ref["G"]), tol)
    _close(net.ggn_diagonal(x, loss=loss, max_memory=1).flat, np.diag(ref["G"]), tol)  # one sample per chunk


def _flat_names(layers):
    """``[(name, array)]`` of a nested ``layers`` list, in order."""
    out = []
    for entry in layers:
        out += _flat_names(entry) if isinstance(entry, list) else list(entry.items())
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_ntk_matches_jacrev(model, dtype):
    m, net, x, _ = _case(model, "mse", dtype, B=5)
    x2 = np.random.default_rng(9).standard_normal((3, 4)).astype(dtype)
    theta, f = _f(m)
    J1 = tf.jacrev(f)(theta, torch.tensor(x.astype(np.float64))).detach().numpy()
    J2 = tf.jacrev(f)(theta, torch.tensor(x2.astype(np.float64))).detach().numpy()
    tol = TOL[dtype]
    K = jg.ntk(net, x)
    assert K.shape == (5, 5, net.n_out, net.n_out) and K.dtype == dtype
    _close(K, np.einsum("iop,jqp->ijoq", J1, J1), tol)
    _close(jg.ntk(net, x, x2, trace=True), np.einsum("iop,jop->ij", J1, J2), tol)
    # chunked: several row and column blocks, symmetric and not
    _close(jg.ntk(net, x, max_memory=1), np.einsum("iop,jqp->ijoq", J1, J1), tol)
    _close(jg.ntk(net, x, x2, max_memory=1), np.einsum("iop,jqp->ijoq", J1, J2), tol)


def test_dense_stack_gives_the_mlp_products():
    mlp = jg.MLP.init([4, 7, 3], activation="tanh", bias_std=0.2, seed=1)
    seq = jg.Sequential([jg.layers.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)])
    rng = np.random.default_rng(0)
    x, t, v = rng.standard_normal((6, 4)), rng.standard_normal((6, 3)), rng.standard_normal(seq.n_params)
    np.testing.assert_allclose(seq.per_sample_grads(x, t).flat, mlp.per_sample_grads(x, t).flat, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(seq.ggn_vp(x, v), mlp.ggn_vp(x, v), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(seq.ggn_diagonal(x).flat, mlp.ggn_diagonal(x).flat, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(jg.ntk(seq, x), jg.ntk(mlp, x), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def small():
    m, net, x, t = _case("deep", "mse", np.float64, B=4)
    return net, x, t


def test_a_direction_of_the_wrong_length_names_P(small):
    net, x, _ = small
    with pytest.raises(ValueError, match=rf"v has shape \(7,\) but the network has P={net.n_params} parameters"):
        net.ggn_vp(x, np.ones(7))


def test_a_wrong_target_shape_is_a_clear_error(small):
    net, x, t = small
    for call in (lambda: net.per_sample_grads(x, t[:, :2]), lambda: net.per_sample_grad_norms(x, t[:3]),
                 lambda: net.ggn_vp(x, np.ones(net.n_params), target=t[:, :2]),
                 lambda: net.ggn_diagonal(x, target=t[:3])):
        with pytest.raises(ValueError, match="shape"):
            call()


def test_per_sample_grads_over_the_budget_says_the_size(small):
    net, x, t = small
    need = x.shape[0] * net.n_params * 8
    with pytest.raises(ValueError, match=rf"B=4 samples x P={net.n_params} parameters .* \({need} bytes\), more than "
                                         r"max_memory.*per_sample_grad_norms"):
        net.per_sample_grads(x, t, max_memory=need - 1)
    assert net.per_sample_grads(x, t, max_memory=need).flat.shape == (4, net.n_params)


def test_ntk_checks_the_input_width(small):
    net, x, _ = small
    with pytest.raises(ValueError, match="x2 has shape \\(2, 3\\) but the network takes 4 features"):
        jg.ntk(net, x, np.ones((2, 3)))
