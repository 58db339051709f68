"""Attacks on Sequential's parameter-space products at their edges, against torch.func on the
torch model each net is read from (``Sequential.from_torch``): degenerate LayerNorm widths
(n = 1, 2), RMSNorm with a tiny eps on near-zero rows, residual scales 0 and negative, softmax
cross-entropy with probability rows that do not sum to 1, sigmoid_bce, identity-only nets, B = 1;
and bad input (max_memory), aliasing of the results."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn, tf = torch.nn, torch.func
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.torch

from test_sequential_param_space import _close, _reference  # noqa: E402 - tests/ is on sys.path

EDGE_MODELS = {
    "layernorm_n1": lambda: nn.Sequential(nn.Linear(4, 1), nn.Tanh(), nn.LayerNorm(1), nn.Linear(1, 3)),
    "layernorm_n2": lambda: nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2), nn.Linear(2, 3)),
    "rmsnorm_tiny_eps": lambda: nn.Sequential(nn.RMSNorm(4, eps=1e-30), nn.Linear(4, 3), nn.Tanh(),
                                              nn.RMSNorm(3, eps=1e-30)),
    "residual_scale_0": lambda: nn.Sequential(nn.Linear(4, 5), Residual(nn.Sequential(nn.Linear(5, 5), nn.Tanh()), 0.0),
                                              nn.Linear(5, 3)),
    "residual_negative": lambda: nn.Sequential(Residual(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.Tanh()),
                                                        -1.5), nn.Linear(4, 3)),
    "identity_only": lambda: nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 3)),
    "norms_only": lambda: nn.Sequential(nn.LayerNorm(4), nn.RMSNorm(4)),
    "residual_only": lambda: nn.Sequential(Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.LayerNorm(4)), 0.9)),
    "residual_of_residual": lambda: nn.Sequential(
        Residual(nn.Sequential(Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), 0.5)), -0.7), nn.Linear(4, 3)),
    "norm_only_residual": lambda: nn.Sequential(Residual(nn.Sequential(nn.LayerNorm(4)), 0.5), nn.Linear(4, 3),
                                                nn.RMSNorm(3)),
}


def _edge(model, seed=0, dtype=np.float64):
    torch.manual_seed(seed)
    m = EDGE_MODELS[model]().double()
    with torch.no_grad():  # γ away from 1, β and the biases away from 0
        for p in (p for p in m.parameters() if p.ndim == 1):
            p.add_(0.3 * torch.randn_like(p))
    return m, jg.Sequential.from_torch(m)


def _inputs(model, B, rng):
    x = rng.standard_normal((B, 4))
    if model == "rmsnorm_tiny_eps":
        x[0] *= 1e-12  # a near-zero row: r = sqrt(mean x² + eps) is tiny but exact
    return x


TARGETS = {"mse": lambda rng, B, C: rng.standard_normal((B, C)),
           "sigmoid_bce": lambda rng, B, C: rng.uniform(0, 1, size=(B, C)),
           "softmax_cross_entropy": lambda rng, B, C: rng.integers(0, C, size=B),
           "softmax_rows": lambda rng, B, C: rng.uniform(0, 1, size=(B, C))}  # rows that do not sum to 1


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("model", sorted(EDGE_MODELS))
def test_edge_products_match_torch_func(model, target, B):
    m, net = _edge(model)
    rng = np.random.default_rng(3)
    x, t = _inputs(model, B, rng), TARGETS[target](rng, B, net.n_out)
    loss = "softmax_cross_entropy" if target == "softmax_rows" else target
    ref = _reference(m, x, t, loss, net.n_out)
    tol = 1e-10
    _close(net.per_sample_grads(x, t, loss=loss).flat, ref["psg"], tol)
    _close(net.per_sample_grad_norms(x, t, loss=loss), np.linalg.norm(ref["psg"], axis=1), tol)
    v = rng.standard_normal(net.n_params)
    _close(net.ggn_vp(x, v, target=t, loss=loss), ref["G"] @ v, tol)
    _close(net.ggn_diagonal(x, target=t, loss=loss).flat, np.diag(ref["G"]), tol)
    J = ref["J"]
    _close(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J, J), tol)
    _close(jg.ntk(net, x, trace=True, max_memory=1), np.einsum("iop,jop->ij", J, J), tol)


# ---------------------------------------------------------------------------- max_memory
def _small_nets():
    rng = np.random.default_rng(0)
    L = jg.layers
    seq = jg.Sequential([L.LayerNorm(np.ones(4)), L.Residual([L.Dense(rng.standard_normal((4, 4)) / 2, None, "tanh")], 0.7),
                         L.Dense(rng.standard_normal((4, 3))), L.RMSNorm(np.ones(3))])
    mlp = jg.MLP.init([4, 5, 3], activation="tanh", seed=0)
    return {"sequential": seq, "mlp": mlp}, rng.standard_normal((5, 4)), rng.standard_normal((5, 3))


@pytest.mark.parametrize("kind", ["sequential", "mlp"])
@pytest.mark.parametrize("bad", [0, -5, float("nan"), True, "1"], ids=["zero", "negative", "nan", "bool", "str"])
def test_a_max_memory_that_is_not_a_positive_number_is_named(kind, bad):
    nets, x, t = _small_nets()
    net = nets[kind]
    calls = {"ntk": lambda: jg.ntk(net, x, max_memory=bad),
             "ggn_diagonal": lambda: net.ggn_diagonal(x, max_memory=bad),
             "per_sample_grads": lambda: net.per_sample_grads(x, t, max_memory=bad)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"max_memory must be a number of bytes > 0, or None"):
            call()


@pytest.mark.parametrize("kind", ["sequential", "mlp"])
def test_a_tiny_max_memory_gives_the_unchunked_result(kind):
    nets, x, t = _small_nets()
    net = nets[kind]
    D = net.ggn_diagonal(x, max_memory=None).flat
    K = jg.ntk(net, x, max_memory=None)
    for mm in (1, 1e-300, np.int64(7)):  # inf is refused: None is "no limit" (test_hardening_numerics)
        np.testing.assert_allclose(net.ggn_diagonal(x, max_memory=mm).flat, D, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(jg.ntk(net, x, max_memory=mm), K, rtol=1e-13, atol=1e-15)
    assert net.per_sample_grads(x, t, max_memory=None).flat.shape == (5, net.n_params if kind == "sequential"
                                                                              else 5 * 4 + 5 + 5 * 3 + 3)


# ---------------------------------------------------------------------------- the parameter direction
@pytest.mark.parametrize("kind", ["sequential", "mlp"])
def test_both_networks_check_v_with_one_message(kind):
    nets, x, _ = _small_nets()
    net = nets[kind]
    P = net.n_params if kind == "sequential" else sum(W.size + W.shape[1] for W in net.weights)
    layout = "Gradients.flat"
    with pytest.raises(ValueError, match=rf"v has shape \({P}, 1\) but the network has P={P} parameters: needs "
                                         rf"\({P},\), laid out as {layout}"):
        net.ggn_vp(x, np.ones((P, 1)))
    with pytest.raises(TypeError, match="v has dtype int64"):
        net.ggn_vp(x, np.ones(P, dtype=np.int64))
    v = np.ones(P)
    before = v.copy()
    net.ggn_vp(x, v)
    np.testing.assert_array_equal(v, before)  # the caller's direction is read, never written


# ---------------------------------------------------------------------------- aliasing
@pytest.mark.parametrize("kind", ["sequential", "mlp"])
def test_results_survive_the_next_call(kind):
    """Every result is the caller's: a second call (which may reuse the pooled gradient blocks of
    a finished call) leaves the first call's results as they were, and no result shares memory
    with the parameters, the input or another result."""
    nets, x, t = _small_nets()
    net = nets[kind]
    P = net.ggn_diagonal(x).flat.size
    v = np.random.default_rng(1).standard_normal(P)
    calls = {"psg": lambda a: net.per_sample_grads(a, t).flat, "norms": lambda a: net.per_sample_grad_norms(a, t),
             "ggn_vp": lambda a: net.ggn_vp(a, v), "ggn_diag": lambda a: net.ggn_diagonal(a).flat,
             "ntk": lambda a: jg.ntk(net, a), "grads": lambda a: net.loss_and_grads(a, t)[1].flat}
    first = {k: f(x) for k, f in calls.items()}
    kept = {k: r.copy() for k, r in first.items()}
    for _ in range(2):
        again = {k: f(2.0 * x) for k, f in calls.items()}  # other values through the same shapes
    params = list(net.weights) + list(net.biases) if kind == "mlp" else [p for L in net.layers for p in L.params]
    for k, r in first.items():
        np.testing.assert_array_equal(r, kept[k], err_msg=k)
        assert not np.array_equal(r, again[k]), k
        assert not any(np.shares_memory(r, p) for p in params + [x]), k
        assert not any(np.shares_memory(r, o) for o in again.values()), k


# ---------------------------------------------------------------------------- float32 nets, float64 inputs
def test_float32_net_takes_float32_inputs_and_answers_in_float32():
    m, net64 = _edge("residual_negative")
    net32 = jg.Sequential.from_torch(m.float())
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))
    x32 = x.astype(np.float32)  # float64 x into a float32 net is refused, never rounded (test_hardening_numerics)
    v = rng.standard_normal(net32.n_params)
    pairs = [(net32.per_sample_grads(x32, t).flat, net64.per_sample_grads(x, t).flat),
             (net32.per_sample_grad_norms(x32, t), net64.per_sample_grad_norms(x, t)),
             (net32.ggn_vp(x32, v), net64.ggn_vp(x, v)),
             (net32.ggn_diagonal(x32).flat, net64.ggn_diagonal(x).flat),
             (jg.ntk(net32, x32, x32[:2], trace=True), jg.ntk(net64, x, x[:2], trace=True))]
    for got, want in pairs:
        assert got.dtype == np.float32
        _close(got, want, 1e-5)


# ---------------------------------------------------------------------------- foreign targets
@pytest.mark.parametrize("kind", ["sequential", "mlp"])
@pytest.mark.parametrize("target", ["labels", "rows"])
def test_torch_targets_work_in_the_gauss_newton_products(kind, target):
    """Every public entry point takes torch arrays; the GGN's target check read ``target.dtype``
    as a NumPy dtype ("Cannot interpret 'torch.float64' as a data type")."""
    nets, x, _ = _small_nets()
    net = nets[kind]
    rng = np.random.default_rng(5)
    t = rng.integers(0, 3, size=5) if target == "labels" else rng.uniform(0, 1, size=(5, 3))
    P = net.ggn_diagonal(x).flat.size
    v = rng.standard_normal(P)
    loss = "softmax_cross_entropy"
    np.testing.assert_array_equal(net.ggn_vp(x, v, torch.tensor(t), loss=loss), net.ggn_vp(x, v, t, loss=loss))
    np.testing.assert_array_equal(net.ggn_diagonal(x, torch.tensor(t), loss=loss).flat,
                                  net.ggn_diagonal(x, t, loss=loss).flat)
    if target == "rows":  # the rows' sums scale H: not the product without the target
        assert not np.allclose(net.ggn_vp(x, v, torch.tensor(t), loss=loss), net.ggn_vp(x, v, loss=loss))


# ---------------------------------------------------------------------------- Dask batches
@pytest.mark.parametrize("call", ["forward", "per_sample_grads", "ggn_vp", "ggn_diagonal", "ntk"])
def test_a_dask_batch_is_refused_where_it_would_be_loaded_whole(call):
    """As for an MLP: only the entry points that map over chunks (per_sample_grad_norms,
    gradient_flow) take a Dask batch; the others must not load the whole dataset silently."""
    da = pytest.importorskip("dask.array")
    nets, x, t = _small_nets()
    net = nets["sequential"]
    X = da.from_array(x, chunks=(2, -1))
    calls = {"forward": lambda: net.forward(X), "per_sample_grads": lambda: net.per_sample_grads(X, t),
             "ggn_vp": lambda: net.ggn_vp(X, np.ones(net.n_params)), "ggn_diagonal": lambda: net.ggn_diagonal(X),
             "ntk": lambda: jg.ntk(net, X)}
    with pytest.raises(TypeError, match="in-memory batch"):
        calls[call]()


def test_an_mlp_refuses_a_dask_batch_in_the_same_places():
    da = pytest.importorskip("dask.array")
    nets, x, t = _small_nets()
    net, X = nets["mlp"], da.from_array(x, chunks=(2, -1))
    for call in (lambda: net.forward(X), lambda: net.per_sample_grads(X, t), lambda: net.ggn_vp(X, np.ones(43)),
                 lambda: net.ggn_diagonal(X), lambda: jg.ntk(net, X)):
        with pytest.raises(TypeError, match="in-memory batch"):
            call()


def test_a_sequential_called_on_a_dask_batch_is_lazy_and_equals_numpy():
    da = pytest.importorskip("dask.array")
    nets, x, _ = _small_nets()
    net = nets["sequential"]
    Y = net(da.from_array(x, chunks=(2, -1)))
    assert isinstance(Y, da.Array) and Y.shape == (x.shape[0], net.n_out)
    np.testing.assert_allclose(Y.compute(), net(x), rtol=1e-13, atol=1e-14)
