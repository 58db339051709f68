"""Issue 20 ("Hardening, round 3"), the importer items: re-used torch modules, one walk for both
torch importers, the copy=False link, flax name order, sklearn output activations, the ``net``
argument of products and reports, and messages in the caller's words. Outputs and gradients are
checked against torch itself (float64, 1e-12), predictions against sklearn's."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch importers need torch")
from torch import nn  # noqa: E402

import jacgrad as jg  # noqa: E402
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _x(n: int = 6, d: int = 3, seed: int = 0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)))


def _torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


# ---------------------------------------------------------------------- 1. re-used modules
def _shared_tanh():
    torch.manual_seed(0)
    t = nn.Tanh()
    return nn.Sequential(nn.Linear(3, 4), t, nn.Linear(4, 4), t, nn.Linear(4, 2)).double()


def _shared_free_block():
    torch.manual_seed(1)
    act = nn.Sequential(nn.Identity(), nn.Tanh())  # a parameter-free block, listed twice
    return nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2), act).double()


@pytest.mark.parametrize("importer", ["MLP", "Sequential"])
@pytest.mark.parametrize("build", [_shared_tanh, _shared_free_block], ids=["tanh", "free-block"])
def test_a_reused_parameter_free_module_is_applied_in_each_place(importer, build):
    """The MLP importer walked named_children, which lists a module once: the second Tanh was
    dropped and the output was off by 0.1 with no error."""
    model, x = build(), _x()
    net = getattr(jg, importer).from_torch(model)
    np.testing.assert_allclose(net(x.numpy()), _torch_out(model, x), **TIGHT)
    target = np.random.default_rng(1).standard_normal((x.shape[0], 2))
    _, g = net.loss_and_grads(x.numpy(), target)
    xt = x.clone()
    loss = ((model(xt) - torch.from_numpy(target)) ** 2).mean()
    grads = torch.autograd.grad(loss, [m.weight for m in model.modules() if isinstance(m, nn.Linear)])
    flat = np.concatenate([g.weights[j].ravel() for j in range(len(grads))]) if importer == "MLP" else \
        np.concatenate([g.layers[j]["W"].ravel() for j in range(len(grads))])
    np.testing.assert_allclose(flat, np.concatenate([gw.T.numpy().ravel() for gw in grads]), **TIGHT)


def _reused_linear():
    torch.manual_seed(2)
    lin = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), lin, nn.Tanh(), lin).double()


def _reused_block():
    torch.manual_seed(3)
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    return nn.Sequential(nn.Linear(3, 4), block, block).double()


def _tied_weight():
    torch.manual_seed(4)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(3, 4), a, nn.Tanh(), b).double()


def _residual_inner_reused_outside():
    torch.manual_seed(5)
    lin = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), Residual(nn.Sequential(lin, nn.Tanh())), lin).double()


@pytest.mark.parametrize("importer", ["MLP", "Sequential"])
@pytest.mark.parametrize("build", [_reused_linear, _reused_block, _tied_weight, _residual_inner_reused_outside],
                         ids=["linear", "block", "tied", "residual"])
def test_a_reused_module_with_parameters_is_one_shared_parameter(importer, build):
    """Refused until issue 22 (and before that imported as two independent copies, without a word,
    by the Sequential importer): now one jacgrad parameter, its gradient torch's (the sum over
    its uses), P counted once."""
    model = build()
    if importer == "MLP" and build is _residual_inner_reused_outside:
        pytest.skip("a residual block is a Sequential's")
    net = getattr(jg, importer).from_torch(model)
    assert net.n_params == sum(p.numel() for p in model.parameters())
    x = _x(d=3)
    np.testing.assert_allclose(net(x.numpy()), _torch_out(model, x), **TIGHT)
    target = np.random.default_rng(1).standard_normal((x.shape[0], net.n_out))
    _, g = net.loss_and_grads(x.numpy(), target)
    loss = ((model(x) - torch.from_numpy(target)) ** 2).mean()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    mine = net._ties().param_views(g.flat)
    for p, gp in zip(params, grads):  # each torch parameter is exactly one jacgrad parameter (W = weight.T)
        w = p.detach().numpy()
        hits = [(m, False) for m, a in zip(mine, net._ties().params) if a.shape == w.shape and np.array_equal(a, w)]
        hits += [(m, True) for m, a in zip(mine, net._ties().params) if w.ndim == 2 and a.shape == w.shape[::-1]
                 and np.array_equal(a, w.T)]
        assert len(hits) == 1
        want = gp.numpy().T if hits[0][1] else gp.numpy()
        np.testing.assert_allclose(hits[0][0], want, **TIGHT)


# ---------------------------------------------------------------------- 18. one walk for both importers
@pytest.mark.parametrize("build", [
    lambda: [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)],
    lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 5), nn.GELU()), nn.Sequential(nn.Linear(5, 2))),
    lambda: (m for m in [nn.Linear(3, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 2), nn.Identity())]),
], ids=["list", "nested", "generator"])
def test_both_importers_take_lists_and_nested_sequentials(build):
    """Sequential.from_torch refused both (a list had no .parameters(); a nested Sequential was
    'not supported') where MLP.from_torch took them."""
    torch.manual_seed(2)
    mods = list(build())
    for m in mods:
        m.double()
    x = _x()
    want = _torch_out(nn.Sequential(*mods), x)
    seq, mlp = jg.Sequential.from_torch(iter(mods)), jg.MLP.from_torch(iter(mods))
    np.testing.assert_allclose(seq(x.numpy()), want, **TIGHT)
    np.testing.assert_allclose(mlp(x.numpy()), want, **TIGHT)
    assert [L.activation for L in seq.layers] == list(mlp.activations)


def test_mlp_to_torch_takes_negative_stride_weights():
    rng = np.random.default_rng(3)
    W0, W1 = rng.standard_normal((5, 3))[::-1].T, rng.standard_normal((2, 5))[:, ::-1].T  # negative strides
    assert any(s < 0 for s in W0.strides) and any(s < 0 for s in W1.strides)
    net = jg.MLP([W0, W1], [rng.standard_normal(5)[::-1], np.zeros(2)], ["tanh", "identity"])
    model = net.to_torch()
    x = _x(d=3)
    np.testing.assert_allclose(_torch_out(model, x), net(x.numpy()), **TIGHT)
    assert not np.shares_memory(model[0].weight.detach().numpy(), W0)


def test_gradient_flow_of_a_sequential_takes_a_tensor_that_requires_grad():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    net = jg.Sequential.from_torch(model)
    x = _x(8).requires_grad_(True)
    got = jg.diagnostics.gradient_flow(net, x)
    want = jg.diagnostics.gradient_flow(net, x.detach().numpy().copy())
    assert got.to_json() == want.to_json()
    assert x.grad is None  # nothing was differentiated in torch
    mlp = jg.MLP.init([3, 4, 2], seed=0)
    assert jg.diagnostics.gradient_flow(mlp, x).to_json() == jg.diagnostics.gradient_flow(mlp, x.detach().numpy()).to_json()


@pytest.mark.parametrize("kind", ["MLP", "Sequential"])
@pytest.mark.parametrize("method", ["per_sample_grad_norms", "per_sample_grads", "loss_and_grads"])
def test_in_memory_x_with_a_dask_target_is_a_clear_type_error(kind, method):
    da = pytest.importorskip("dask.array", reason="the Dask paths need dask")
    net = jg.MLP.init([3, 4, 2], seed=0)
    if kind == "Sequential":
        net = jg.Sequential([jg.layers.Dense(w, b, a) for w, b, a in zip(net.weights, net.biases, net.activations)])
    X, T = np.ones((10, 3)), da.zeros((10, 2), chunks=5)
    with pytest.raises(TypeError, match=r"the target is a dask\.array\.core\.Array .* in-memory array: pass x and the "
                                        r"target both as Dask arrays .* or neither"):
        getattr(net, method)(X, T)
    lazy = net.per_sample_grad_norms(da.from_array(X, chunks=5), T)  # both Dask: mapped over the chunks
    np.testing.assert_allclose(lazy.compute(), net.per_sample_grad_norms(X, np.zeros((10, 2))), rtol=1e-12)


# ---------------------------------------------------------------------- 7. the copy=False link
def _model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


STALE = r"torch model's parameters were re-allocated \(e\.g\. by \.double\(\), \.to\(\), load_state_dict\(assign=True\)\) " \
        r"since import with copy=False.*re-import it"


def _reallocate(how: str, model):
    if how == "double":
        model.double()
    elif how == "to":
        model.to(torch.float64)
    elif how == "assign":
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    else:  # p.data = ...
        model[2].bias.data = model[2].bias.data.clone()


@pytest.mark.parametrize("importer", ["MLP", "Sequential"])
@pytest.mark.parametrize("how", ["double", "to", "assign", "data"])
def test_a_copy_false_import_raises_once_torch_reallocates_its_parameters(importer, how):
    """Before, the net kept computing with the old memory: after .double() and 5 SGD steps it
    was 0.73 off torch, without a word."""
    model = _model()
    net = getattr(jg, importer).from_torch(model, copy=False)
    x32, t32 = _x().float().numpy(), np.zeros((6, 2), np.float32)
    _, cache = net.forward(x32)
    step, jstep = net.compile(6), net.compile_jacobian(6)
    _reallocate(how, model)
    x = x32.astype(net.dtype)
    t = t32.astype(net.dtype)
    calls = {
        "call": lambda: net(x), "forward": lambda: net.forward(x),
        "backward": lambda: net.backward(cache, t), "jacobian_chain": lambda: net.jacobian_chain(cache),
        "loss_and_grads": lambda: net.loss_and_grads(x, t), "per_sample_grad_norms": lambda: net.per_sample_grad_norms(x, t),
        "ggn_vp": lambda: net.ggn_vp(x, np.ones(32, net.dtype)),
        "ntk": lambda: jg.ntk(net, x), "gradient_flow": lambda: jg.diagnostics.gradient_flow(net, x),
        "compiled step": lambda: step(x, t), "compiled jacobian": lambda: jstep(x), "pickle": lambda: pickle.dumps(net),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=STALE):
            call()
    fresh = getattr(jg, importer).from_torch(model, copy=False)  # re-importing mends it
    np.testing.assert_allclose(fresh(x.astype(fresh.dtype)), _torch_out(model, torch.from_numpy(x).to(model[0].weight.dtype)),
                               rtol=1e-6, atol=1e-6)


def test_in_place_training_stays_linked_and_matches_torch():
    """What the link allows: an optimiser's in-place steps are seen, to float64 precision."""
    model = _model().double()
    net = jg.MLP.from_torch(model, copy=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, t = _x(), torch.zeros(6, 2, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - t) ** 2).mean().backward()
        opt.step()
    np.testing.assert_allclose(net(x.numpy()), _torch_out(model, x), **TIGHT)
    copied = pickle.loads(pickle.dumps(net))  # a pickled net holds copies and no link
    assert copied.imported_from == "torch"
    before = net(x.numpy())
    model.float()
    with pytest.raises(RuntimeError, match=STALE):
        net(x.numpy())
    np.testing.assert_array_equal(copied(x.numpy()), before)


# ---------------------------------------------------------------------- 20. the net argument
def _product_calls():
    da = pytest.importorskip("dask.array", reason="the distributed entries need dask")
    X = da.ones((4, 3), chunks=2)
    return {
        "gradient_flow": lambda net: jg.diagnostics.gradient_flow(net, np.ones((4, 3))),
        "ntk": lambda net: jg.ntk(net, np.ones((4, 3))),
        "jacgrad.distributed.forward": lambda net: jg.distributed.forward(net, X),
        "jacgrad.distributed.jacobian_spectral_norm": lambda net: jg.distributed.jacobian_spectral_norm(net, X),
        "jacgrad.distributed.jacobian_singular_values": lambda net: jg.distributed.jacobian_singular_values(net, X),
        "block_report": lambda net: jg.block_flow.block_report(net, np.ones((4, 3))),
        "block_flow": lambda net: jg.block_flow.block_flow(net, np.ones((4, 3))),
    }


@pytest.mark.parametrize("who", ["gradient_flow", "ntk", "jacgrad.distributed.forward",
                                 "jacgrad.distributed.jacobian_spectral_norm",
                                 "jacgrad.distributed.jacobian_singular_values", "block_report", "block_flow"])
def test_a_torch_model_given_to_a_product_says_to_import_it(who):
    call = _product_calls()[who]

    class Custom(nn.Module):
        def forward(self, x):
            return x

    for model, name in ((_model(), r"torch\.nn\.modules\.container\.Sequential"),
                        (Custom(), rf"{__name__}\.test_a_torch_model_given_to_a_product_says_to_import_it\.<locals>\.Custom")):
        with pytest.raises(TypeError, match=rf"^{who} needs a jacgrad network \(jg\.MLP or jg\.Sequential\), got a {name}; "
                                            r"import it first with jg\.Sequential\.from_torch\(model\)"):
            call(model)
    with pytest.raises(TypeError, match=rf"^{who} needs a jacgrad network .*got a builtins\.dict$"):
        call({"W": 1})


def test_an_sklearn_estimator_given_to_a_product_says_to_import_it():
    pytest.importorskip("sklearn", reason="needs scikit-learn")
    from sklearn.neural_network import MLPRegressor

    with pytest.raises(TypeError, match=r"got a sklearn\.neural_network\._multilayer_perceptron\.MLPRegressor; import "
                                        r"it first with jg\.MLP\.from_sklearn\(estimator\)"):
        jg.ntk(MLPRegressor(), np.ones((2, 3)))


# ---------------------------------------------------------------------- 5. flax name order
def test_flax_names_with_several_prefixes_are_refused_naming_them():
    rng = np.random.default_rng(6)
    params = {"Dense_0": {"kernel": rng.standard_normal((3, 4)), "bias": np.zeros(4)},
              "Dense_1": {"kernel": rng.standard_normal((4, 4)), "bias": np.zeros(4)},
              "Head_0": {"kernel": rng.standard_normal((4, 4)), "bias": np.zeros(4)}}
    with pytest.raises(ValueError, match=r"flax layers Dense_0, Dense_1, Head_0 have several name prefixes "
                                         r"\(Dense, Head\).*order in the stack is unknown"):
        jg.MLP.from_flax(params, "tanh")


def test_flax_one_prefix_keeps_numeric_order():
    rng = np.random.default_rng(7)
    Ws = [rng.standard_normal((3, 3)) for _ in range(12)]
    params = {f"Dense_{j}": {"kernel": W, "bias": np.full(3, 0.1 * j)} for j, W in reversed(list(enumerate(Ws)))}
    net = jg.MLP.from_flax({"params": params}, "tanh")
    assert net.imported_from == "flax"
    z = x = rng.standard_normal((4, 3))
    for j, W in enumerate(Ws):  # Dense_10 after Dense_9, whatever the dict order
        z = np.tanh(z @ W + 0.1 * j)
    np.testing.assert_allclose(net(x), z, **TIGHT)


# ---------------------------------------------------------------------- 6. sklearn outputs
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(8)
    X = rng.standard_normal((60, 4))
    return X, X @ rng.standard_normal(4)


def _fit(est, X, y):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def test_sklearn_poisson_regressor_is_refused_not_read_as_log_predict(data):
    pytest.importorskip("sklearn", reason="needs scikit-learn")
    from sklearn.neural_network import MLPRegressor

    X, y = data
    est = _fit(MLPRegressor(hidden_layer_sizes=(5,), loss="poisson", max_iter=20, random_state=0), X, np.exp(0.3 * y))
    with pytest.raises(ValueError, match=r"MLPRegressor\(loss='poisson', \.\.\.\) has output activation "
                                         r"out_activation_='exp'.*log of predict"):
        jg.MLP.from_sklearn(est)


def test_sklearn_outputs_match_predict_and_predict_proba(data):
    pytest.importorskip("sklearn", reason="needs scikit-learn")
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    X, y = data
    reg = _fit(MLPRegressor(hidden_layer_sizes=(5,), max_iter=50, random_state=0), X, y)
    net = jg.MLP.from_sklearn(reg)
    assert reg.out_activation_ == "identity" and net.imported_from == "sklearn"
    np.testing.assert_allclose(net(X)[:, 0], reg.predict(X), **TIGHT)
    multi = _fit(MLPClassifier(hidden_layer_sizes=(5,), max_iter=50, random_state=0), X, np.digitize(y, [-1, 1]))
    z = jg.MLP.from_sklearn(multi)(X)  # logits: the softmax belongs to softmax_cross_entropy
    assert multi.out_activation_ == "softmax"
    np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(1, keepdims=True), multi.predict_proba(X), **TIGHT)
    binary = _fit(MLPClassifier(hidden_layer_sizes=(5,), max_iter=50, random_state=0), X, y > 0)
    z = jg.MLP.from_sklearn(binary)(X)
    assert binary.out_activation_ == "logistic"
    np.testing.assert_allclose(1 / (1 + np.exp(-z[:, 0])), binary.predict_proba(X)[:, 1], **TIGHT)


def test_every_output_sklearn_sets_is_mapped_or_refused():
    """sklearn's table of activations, minus the hidden-only ones, is exactly what the importer
    reads or refuses by name."""
    base = pytest.importorskip("sklearn.neural_network._base", reason="needs scikit-learn")
    from jacgrad.io.interop.sklearn import ACTIVATIONS, OUTPUT_ACTIVATIONS

    outputs = set(base.ACTIVATIONS) - (set(ACTIVATIONS) - {"identity", "logistic"})
    assert set(OUTPUT_ACTIVATIONS) == outputs
    assert all(v is None or v in jg.activations.names() for v in OUTPUT_ACTIVATIONS.values())


# ---------------------------------------------------------------------- 26. messages
def test_dropout_in_training_mode_message_reads_as_a_sentence():
    for importer in (jg.MLP, jg.Sequential):
        with pytest.raises(TypeError) as info:
            importer.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)))
        msg = str(info.value)
        assert "is in training mode" in msg and "call model.eval() first" in msg
        assert "—;" not in msg and " ;" not in msg and ";;" not in msg


class _Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("importer", ["MLP", "Sequential"])
def test_a_custom_module_is_named_by_class_and_path_without_its_repr(importer):
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), _Big()))
    with pytest.raises(TypeError) as info:
        getattr(jg, importer).from_torch(model)
    msg = str(info.value)
    assert f"module 1.1 (_Big) is not supported: it is a custom module ({__name__}._Big)" in msg
    assert "in_features" not in msg and "(inner)" not in msg


@pytest.mark.parametrize("block", [lambda: nn.LayerNorm(4), lambda: nn.RMSNorm(4),
                                   lambda: Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))],
                         ids=["LayerNorm", "RMSNorm", "Residual"])
def test_mlp_from_torch_of_a_block_model_points_to_sequential_from_torch(block):
    model = nn.Sequential(nn.Linear(3, 4), block(), nn.Linear(4, 2)).double()
    with pytest.raises(TypeError, match=r"module 1 \((LayerNorm|RMSNorm|Residual).*\) is not a dense layer.*"
                                        r"jg\.Sequential\.from_torch\(model\)"):
        jg.MLP.from_torch(model)
    x = _x()
    np.testing.assert_allclose(jg.Sequential.from_torch(model)(x.numpy()), _torch_out(model, x), **TIGHT)  # which takes it


class _NotATensor:
    pass


def test_torch_load_errors_lose_the_terminal_escape_codes(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"0.weight": torch.ones(2, 2), "extra": _NotATensor()}, path)  # an object: not weights_only
    with pytest.raises(Exception) as raw:
        torch.load(path, weights_only=True)
    assert "\x1b[" in str(raw.value)  # torch bolds part of it
    with pytest.raises(ValueError) as info:
        jg.MLP.load(path, activations=["identity"])
    assert "\x1b" not in str(info.value) and "[1m" not in str(info.value)
    assert "weights_only=True" in str(info.value) and "Unsupported global" in str(info.value)


def test_hints_of_a_torch_model_name_torch_init_calls():
    torch.manual_seed(9)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 2))
    x = _x(8, 16).float()
    net = jg.MLP.from_torch(model)
    assert net.imported_from == "torch"
    with pytest.raises(AttributeError):
        net.imported_from = None
    report = jg.diagnostics.gradient_flow(net, x)
    assert report.verdict == "vanishing"
    text = " ".join(report.hints)
    assert "nn.init.xavier_normal_(linear.weight)" in text and "init='" not in text
    ours = jg.MLP([W.copy() for W in net.weights], [b.copy() for b in net.biases], list(net.activations))
    assert ours.imported_from is None
    native = " ".join(jg.diagnostics.gradient_flow(ours, x).hints)
    assert "init='xavier_normal'" in native and "nn.init" not in native
    assert len(report.hints) == len(jg.diagnostics.gradient_flow(ours, x).hints)
