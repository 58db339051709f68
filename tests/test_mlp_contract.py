"""The MLP's contract with its caller (issue 9): results never alias what backward reads, the
public per-layer lists are what the computation reads (and refuse what would break it), and
bad construction arguments are named. References are NumPy products written out here."""

import ast
import importlib.util
import pathlib
import pickle

import numpy as np
import pytest

import jacgrad as jg

OUTPUT_FROM_Y = ["tanh", "sigmoid", "relu", "identity"]  # φ' is a function of the output: y is saved


def numpy_forward(weights, biases, names, x):
    """The network's output by plain NumPy, activation by activation from the table's f."""
    z = x
    for W, b, name in zip(weights, biases, names):
        z = jg.activations.get(name).f(z @ W + b)
    return z


# ----------------------------------------------------------------------------- item 1: aliasing
@pytest.mark.parametrize("output", OUTPUT_FROM_Y)
def test_changing_the_returned_output_in_place_changes_nothing_backward_reads(rng, output):
    net = jg.MLP.init([4, 5, 3], activation="tanh", output_activation=output, seed=0, bias_std=0.3)
    x, t = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    y_ref, cache_ref = net.forward(x)
    g_ref = net.backward(cache_ref, (y_ref - t) * (2 / y_ref.size))
    J_ref = net.jacobian_chain(cache_ref).jacobian()

    y, cache = net.forward(x)
    assert not any(np.shares_memory(y, a) for a in cache.saved)
    y -= t  # the residual, formed in place
    y *= 2 / y.size
    g = net.backward(cache, y)
    for a, b in zip(g.weights + g.biases + [g.input], g_ref.weights + g_ref.biases + [g_ref.input]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(net.jacobian_chain(cache).jacobian(), J_ref)


def test_replacing_a_weight_or_activation_after_forward_is_refused(rng):
    net = jg.MLP.init([4, 5, 3], seed=0)
    x = rng.standard_normal((6, 4))
    y, cache = net.forward(x)
    net.weights[1] = net.weights[1].copy()
    for call in (lambda: net.backward(cache, np.ones_like(y)), lambda: net.jacobian_chain(cache)):
        with pytest.raises(ValueError, match=r"net.weights\[1\] was replaced after this cache's forward pass"):
            call()
    y, cache = net.forward(x)  # a fresh forward pass is fine
    net.backward(cache, np.ones_like(y))
    net.activations[0] = "relu"
    with pytest.raises(ValueError, match=r"net.activations\[0\] was replaced"):
        net.backward(cache, np.ones_like(y))


def test_an_in_place_weight_change_is_read_when_backward_runs(rng):
    """Documented: the cache keeps activations, not weights; backward reads the weights as they
    are when it runs. One identity layer: ∂L/∂x = g Wᵀ with the CURRENT W, ∂L/∂W = xᵀ g."""
    net = jg.MLP([rng.standard_normal((4, 3))], activations="identity")
    x, gy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    _, cache = net.forward(x)
    net.weights[0] *= 2.0  # in place: not detected, by design
    g = net.backward(cache, gy)
    np.testing.assert_allclose(g.input, gy @ net.weights[0].T, rtol=1e-14)
    np.testing.assert_allclose(g.weights[0], x.T @ gy, rtol=1e-14)


# ----------------------------------------------------------------------------- item 2: the public lists
def test_a_changed_activation_is_what_forward_repr_save_and_the_report_use(rng, tmp_path):
    net = jg.MLP.init([4, 6, 5, 3], activation="tanh", seed=1, bias_std=0.2)
    x = rng.standard_normal((7, 4))
    net.activations[0] = "relu"
    assert list(net.activations) == ["relu", "tanh", "identity"]
    want = numpy_forward(list(net.weights), list(net.biases), ["relu", "tanh", "identity"], x)
    np.testing.assert_allclose(net(x), want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(net.forward(x)[0], want, rtol=1e-13, atol=1e-15)
    assert "[relu, tanh, identity]" in repr(net)
    net.save(tmp_path / "n.npz")
    back = jg.MLP.load(tmp_path / "n.npz")
    np.testing.assert_array_equal(back(x), net(x))
    assert jg.diagnostics.gradient_flow(net, x).activations == ["relu", "tanh", "identity"]
    # gradients of the relu net, against finite differences of its own forward
    t = rng.standard_normal((7, 3))
    _, g = net.loss_and_grads(x, t)
    num = jg.check.numerical_jacobian(lambda xx: jg.losses.mse(net(xx), t)[0], x)
    assert jg.check.relative_error(g.input, num) < 1e-6


def test_a_replaced_weight_is_what_forward_uses(rng):
    net = jg.MLP.init([4, 6, 3], seed=1)
    W = rng.standard_normal((6, 3))
    net.weights[-1] = W
    assert net.weights[1] is W  # kept by reference, like the constructor
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(net(x), numpy_forward([net.weights[0], W], list(net.biases), ["tanh", "identity"], x),
                               rtol=1e-13)


@pytest.mark.parametrize("value,error,match", [
    (np.ones((5, 3)), ValueError, r"layer 1: W has shape \(5, 3\) but this network's layer 1 needs \(6, 3\)"),
    (np.ones((6, 3), dtype=np.int64), TypeError, r"layer 1: W has dtype int64"),
    (np.ones((6, 3), dtype=np.float32), TypeError, r"layer 1: W has dtype float32 but this network is float64"),
    (np.ones((6, 3), dtype=np.complex128), TypeError, r"layer 1: W has dtype complex128"),
    ([[1.0] * 3] * 6, TypeError, r"layer 1: W must be a NumPy or CuPy array, not list"),
    (np.ones(18), ValueError, r"layer 1: W has shape \(18,\)"),
])
def test_a_bad_weight_is_refused_naming_the_layer_and_nothing_changes(rng, value, error, match):
    net = jg.MLP.init([4, 6, 3], seed=1)
    before, x = net.weights[1], rng.standard_normal((2, 4))
    y = net(x)
    with pytest.raises(error, match=match):
        net.weights[1] = value
    assert net.weights[1] is before
    np.testing.assert_array_equal(net(x), y)


def test_a_tensor_of_another_framework_is_refused_clearly():
    torch = pytest.importorskip("torch")
    net = jg.MLP.init([4, 6, 3], seed=1)
    with pytest.raises(TypeError, match=r"layer 0: W must be a NumPy or CuPy array, not torch.Tensor"):
        net.weights[0] = torch.zeros(4, 6, dtype=torch.float64)


def test_bad_biases_and_activations_are_refused_naming_the_layer():
    net = jg.MLP.init([4, 6, 3], seed=1)
    with pytest.raises(ValueError, match=r"layer 0: bias has shape \(3,\) but this network's layer 0 needs \(6,\)"):
        net.biases[0] = np.zeros(3)
    with pytest.raises(TypeError, match=r"layer 1: bias has dtype float32"):
        net.biases[-1] = np.zeros(3, np.float32)
    with pytest.raises(KeyError, match=r"layer 1: unknown activation 'rleu'; valid names: .*relu"):
        net.activations[1] = "rleu"
    with pytest.raises(IndexError, match=r"net.activations\[2\]: the network has 2 layers"):
        net.activations[2] = "tanh"
    assert list(net.activations) == ["tanh", "identity"]


@pytest.mark.parametrize("change", [
    lambda L: L.append(np.ones((3, 3))),
    lambda L: L.extend([np.ones((3, 3))]),
    lambda L: L.insert(0, np.ones((4, 4))),
    lambda L: L.pop(),
    lambda L: L.clear(),
    lambda L: L.__delitem__(0),
    lambda L: L.__iadd__([np.ones((3, 3))]),
    lambda L: L.__setitem__(slice(0, 1), [np.ones((4, 6))]),
    lambda L: L.reverse(),
])
def test_the_number_of_layers_is_fixed(change):
    net = jg.MLP.init([4, 6, 3], seed=1)
    before = list(net.weights)
    with pytest.raises(TypeError, match=r"net.weights.*(length is fixed|slice assignment is not supported)"):
        change(net.weights)
    assert len(net.weights) == 2 and all(a is b for a, b in zip(net.weights, before))
    with pytest.raises(AttributeError, match="net.weights cannot be replaced as a whole"):
        net.weights = before


def test_the_lists_still_read_like_lists():
    net = jg.MLP.init([4, 6, 3], seed=1)
    W0, W1 = net.weights
    tail = net.weights[1:]
    assert isinstance(tail, list) and len(tail) == 1 and tail[0] is W1
    both = net.weights + net.biases
    assert isinstance(both, list) and len(both) == 4 and both[0] is W0
    assert net.activations == ["tanh", "identity"] and net.activations == ("tanh", "identity")
    assert "tanh" in net.activations and net.activations.index("identity") == 1
    assert [a for a in reversed(net.activations)] == ["identity", "tanh"]
    back = pickle.loads(pickle.dumps(net))  # a net still travels (to dask workers, say) and stays checked
    assert back.activations == net.activations and np.array_equal(back.weights[1], W1)
    with pytest.raises(ValueError, match="layer 0: W has shape"):
        back.weights[0] = np.ones((2, 2))


# ----------------------------------------------------------------------------- item 8: zero widths
def test_zero_width_layers_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"layer 0: W has shape \(3, 0\).*zero-width"):
        jg.MLP([np.ones((3, 0)), np.ones((0, 2))])
    with pytest.raises(ValueError, match=r"layer 1: W has shape \(4, 0\)"):
        jg.MLP([np.ones((3, 4)), np.ones((4, 0))])
    with pytest.raises(ValueError, match=r"sizes\[1\] = 0: layer 0's output width must be at least 1"):
        jg.MLP.init([3, 0, 2])
    with pytest.raises(ValueError, match=r"sizes\[0\] = 0: the input width"):
        jg.MLP.init([0, 2])


# ----------------------------------------------------------------------------- item 9: init arguments
@pytest.mark.parametrize("init", ["xavier_normal", "orthogonal"])
@pytest.mark.parametrize("gain", [np.nan, np.inf, -np.inf, -1.0])
def test_a_bad_gain_is_named(init, gain):
    with pytest.raises(ValueError, match=r"gain must be finite and ≥ 0"):
        jg.MLP.init([5, 4, 3], init=init, gain=gain, seed=0)


def test_the_initializer_itself_refuses_a_negative_gain():
    with pytest.raises(ValueError, match="gain must be finite and ≥ 0, got -2.0"):
        jg.initializers.init_weight("orthogonal", 4, 3, -2.0, np.random.default_rng(0))


@pytest.mark.parametrize("bias_std", [np.nan, np.inf, -0.5])
def test_a_bad_bias_std_is_named(bias_std):
    with pytest.raises(ValueError, match=r"bias_std must be finite and ≥ 0"):
        jg.MLP.init([5, 4, 3], bias_std=bias_std, seed=0)


def test_gain_zero_and_integer_valued_float_widths_are_accepted():
    assert not np.any(jg.MLP.init([5, 4], gain=0.0, init="orthogonal", seed=0).weights[0])
    a, b = jg.MLP.init([3.0, np.float64(4), np.int32(2)], seed=3), jg.MLP.init([3, 4, 2], seed=3)
    assert a.sizes == [3, 4, 2] and all(np.array_equal(p, q) for p, q in zip(a.weights, b.weights))


@pytest.mark.parametrize("sizes,error,match", [
    ([3, 2.7], ValueError, r"sizes\[1\] = 2.7: layer widths must be integers"),
    ([3, np.nan, 2], ValueError, r"sizes\[1\] = nan"),
    ([3, True], TypeError, r"sizes\[1\] = True"),
    (["3", 2], TypeError, r"sizes\[0\] = '3'"),
    ([3], ValueError, r"at least two"),
])
def test_bad_sizes_are_named_not_truncated(sizes, error, match):
    with pytest.raises(error, match=match):
        jg.MLP.init(sizes)


# ----------------------------------------------------------------------------- item 11: one activation per hidden layer
def test_init_takes_one_activation_per_hidden_layer(rng):
    net = jg.MLP.init([4, 6, 5, 3], activation=["relu", "sigmoid"], output_activation="tanh", seed=4, bias_std=0.3)
    assert list(net.activations) == ["relu", "sigmoid", "tanh"]
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(net(x), numpy_forward(list(net.weights), list(net.biases), ["relu", "sigmoid", "tanh"], x),
                               rtol=1e-13)
    with pytest.raises(ValueError, match=r"activation has 3 names but sizes \[4, 6, 5, 3\] has 2 hidden layers"):
        jg.MLP.init([4, 6, 5, 3], activation=["relu"] * 3)
    with pytest.raises(KeyError, match=r"layer 1: unknown activation 'sigmod'"):
        jg.MLP.init([4, 6, 5, 3], activation=["relu", "sigmod"])
    with pytest.raises(KeyError, match=r"output_activation: unknown activation"):
        jg.MLP.init([4, 3], output_activation="soft")


# ----------------------------------------------------------------------------- item 12: imports point down
def _imports(module) -> set:
    """The full names of the modules ``module``'s file imports relatively (both layouts)."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    return {importlib.util.resolve_name("." * node.level + node.module, module.__package__)
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level and node.module}


def test_the_compiled_step_does_not_import_the_network_module():
    assert jg.mlp.__name__ not in _imports(jg.compiled)
    assert {jg.compiled.__name__, "jacgrad.steps.compiled_products"} & _imports(jg.mlp)  # net.compile: the step or a product
    step = jg.compiled.TrainingStep(jg.MLP.init([3, 2], seed=0), 2)  # duck-typed: any net with the lists
    with pytest.raises(TypeError, match="TrainingStep compiles an MLP"):
        jg.compiled.TrainingStep(object(), 2)
    assert step.batch == 2
