"""MLP: backprop against finite differences, the Jacobian chain, memory, inits and bad input.
PyTorch cross-checks live in test_mlp_torch.py."""

import tracemalloc

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.nn import initializers
from jacgrad.algebra.check import numerical_jacobian, relative_error

ACTIVATIONS = jg.activations.names()


def small_net(activation="tanh", output="identity", sizes=(5, 7, 6, 3), seed=0, **kw):
    return jg.MLP.init(list(sizes), activation=activation, output_activation=output, seed=seed, bias_std=0.3, **kw)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weight_bias_input_grads_match_finite_differences(rng, activation):
    net = small_net(activation, output=activation)
    x = rng.standard_normal((4, 5))
    t = rng.standard_normal((4, 3))
    loss, g = net.loss_and_grads(x, t, "mse")

    def loss_of(j, which):
        def f(p):
            arrays = [list(net.weights), list(net.biases)][which]
            arrays[j] = p
            other = jg.MLP(arrays if which == 0 else net.weights, arrays if which == 1 else net.biases, net.activations)
            return jg.losses.mse(other(x), t)[0]
        return f

    for j in range(net.depth):
        assert relative_error(g.weights[j], numerical_jacobian(loss_of(j, 0), net.weights[j])) < 1e-6
        assert relative_error(g.biases[j], numerical_jacobian(loss_of(j, 1), net.biases[j])) < 1e-6
    num_x = numerical_jacobian(lambda x: jg.losses.mse(net(x), t)[0], x)
    assert relative_error(g.input, num_x) < 1e-6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_is_the_chain_vjp(rng, xp, activation):
    """g.input and every delta come from the same factors as jacobian_chain."""
    net = small_net(activation, output="sigmoid", device="gpu" if xp is not np else "cpu")
    x = xp.asarray(rng.standard_normal((6, 5)))
    y, cache = net.forward(x)
    gy = xp.asarray(rng.standard_normal(y.shape))
    g = net.backward(cache, gy)
    C = net.jacobian_chain(cache)
    assert relative_error(g.input, C.vjp(gy)) < 1e-13
    Jfull = jg.to_numpy(C.jacobian())
    assert relative_error(g.input, np.einsum("bo,boi->bi", jg.to_numpy(gy), Jfull)) < 1e-12
    # δ_j = ∂L/∂h_j: the cotangent after the factor's diagonal
    assert relative_error(g.deltas[-1], jg.to_numpy(gy) * jg.to_numpy(C[-1].d)) < 1e-14


def test_jacobian_chain_matches_finite_differences(rng):
    net = small_net("gelu", output="softplus")
    x = rng.standard_normal((3, 5))
    _, cache = net.forward(x)
    J = net.jacobian_chain(cache).jacobian()
    for b in range(3):
        num = numerical_jacobian(lambda xb: net(xb[None])[0], x[b])
        assert relative_error(J[b], num) < 1e-8


def test_float32_network_stays_float32_and_tracks_float64(rng):
    n64 = small_net("tanh", dtype="float64")
    n32 = small_net("tanh", dtype="float32")
    x = rng.standard_normal((8, 5))
    t = rng.standard_normal((8, 3))
    l32, g32 = n32.loss_and_grads(x.astype(np.float32), t)  # float64 x would be refused (never rounded)
    l64, g64 = n64.loss_and_grads(x, t)
    assert l32.dtype == np.float32 and all(w.dtype == np.float32 for w in g32.weights + g32.biases + [g32.input])
    for a, b in zip(g32.weights + g32.biases, g64.weights + g64.biases):
        assert relative_error(a, b) < 1e-5


def test_empty_batch(rng):
    net = small_net()
    loss, g = net.loss_and_grads(np.zeros((0, 5)), np.zeros((0, 3)))
    assert g.input.shape == (0, 5)
    assert all(np.all(w == 0) for w in g.weights)
    assert net.jacobian_chain(net.forward(np.zeros((0, 5)))[1]).jacobian().shape == (0, 3, 5)


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_forward_keeps_one_array_per_layer_and_backward_peak_is_bounded(activation):
    rng = np.random.default_rng(0)
    B, H, K = 64, 256, 6
    net = jg.MLP.init([H] * (K + 1), activation=activation, seed=1)
    x = rng.standard_normal((B, H))
    layer = B * H * 8
    y, cache = net.forward(x)
    assert len(cache.saved) == K and cache.nbytes == K * layer
    del y, cache
    tracemalloc.start()
    y, cache = net.forward(x)
    kept, peak_fwd = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # What stays allocated is the cache (the output is its last array, or for gelu one more
    # (B, H)); the transient peak is the elementwise temporaries of one layer — O(B·H), with
    # a constant set by the NumPy erf's piecewise rational evaluation (about 16 (B, H) arrays).
    assert kept <= K * layer + layer + 4096, "forward kept more than one (B, H) array per layer"
    assert peak_fwd <= K * layer + 20 * layer

    gy = np.ones_like(y)
    scratch_before = jg.kernels.scratch_nbytes()
    tracemalloc.start()
    g = net.backward(cache, gy)
    kept, peak_bwd = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    returned = sum(a.nbytes for a in g.weights + g.biases + g.deltas) + g.input.nbytes
    # the kernels' reusable work arrays (at most two (B, H) arrays, kept between calls)
    scratch = jg.kernels.scratch_nbytes() - scratch_before
    assert scratch <= 2 * layer
    assert kept <= returned + scratch + 16384, "backward kept arrays beyond the gradients it returns"
    assert peak_bwd <= returned + 20 * layer, "backward peaked above its outputs + O(B·H)"


def test_gelu_backward_computes_the_normal_cdf_once_per_layer(rng, monkeypatch):
    """Recomputing z_{j-1} from h_{j-1} for ∂L/∂W_j also yields φ'_{j-1}: one normal CDF per
    layer in backward (K), not one for z and one for φ' (2K - 1)."""
    from jacgrad.elementwise import activations

    calls = []
    real = activations._normal_cdf
    monkeypatch.setattr(activations, "_normal_cdf", lambda h: calls.append(1) or real(h))
    K = 4
    net = jg.MLP.init([6] * (K + 1), activation="gelu", output_activation="gelu", seed=3, bias_std=0.2)
    x = rng.standard_normal((5, 6))
    y, cache = net.forward(x)
    assert len(calls) == K
    calls.clear()
    g = net.backward(cache, np.ones_like(y))
    assert len(calls) == K
    ref = net.compile(5)(x, y + 1.0)  # mse of (y - (y + 1)): the same ∂L/∂y up to the 2/N factor
    for a, b in zip(g.weights, ref[1].weights):
        np.testing.assert_allclose(a * (2.0 / y.size), -b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("output", ["identity", "gelu"])
def test_a_kept_output_does_not_keep_the_hidden_layers_alive(rng, output):
    net = jg.MLP.init([64, 256, 256, 3], output_activation=output, seed=0)
    x = rng.standard_normal((32, 64))
    net(x)  # warm the host pool
    tracemalloc.start()
    kept = [net(x) for _ in range(5)]  # an inference loop that collects its outputs
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert all(y.shape == (32, 3) for y in kept)
    assert held <= 5 * 32 * 3 * 8 + 8192, f"5 outputs of 768 bytes hold {held} bytes"


def test_gradients_flat_is_every_parameter_gradient_in_save_order(rng):
    net = jg.MLP.init([5, 7, 6, 3], seed=2, bias_std=0.3)
    x, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    _, g = net.loss_and_grads(x, t)
    # reference: concatenating the separate arrays in the order W0, b0, W1, b1, …
    ref = np.concatenate([a.ravel() for W, b in zip(g.weights, g.biases) for a in (W, b)])
    np.testing.assert_array_equal(g.flat, ref)
    assert g.flat.shape == (sum(W.size + b.size for W, b in zip(net.weights, net.biases)),)
    g.flat *= 2.0  # the per-layer arrays are views: scaling the block scales them
    np.testing.assert_array_equal(g.weights[1], 2.0 * ref[5 * 7 + 7 : 5 * 7 + 7 + 7 * 6].reshape(7, 6))
    assert np.linalg.norm(g.flat) == pytest.approx(2.0 * np.sqrt(float(ref @ ref)), rel=1e-12)


def test_a_backward_pass_makes_a_few_blocks_not_one_array_per_layer():
    """The returned arrays come from three allocations (parameter gradients, deltas, input
    gradient), whatever the depth: a fresh step then touches a few large blocks (huge pages)."""
    rng = np.random.default_rng(0)
    B, H, K = 32, 64, 12
    net = jg.MLP.init([H] * (K + 1), seed=1)
    x = rng.standard_normal((B, H))
    y, cache = net.forward(x)
    blocks = [a.base.ctypes.data for a in cache.saved]
    assert len(set(blocks[:-1])) == 1 and blocks[-1] not in blocks[:-1]  # hidden layers: one block; output: its own
    net.backward(cache, np.ones_like(y))  # makes the kernels' reusable scratch, kept between calls
    tracemalloc.start()
    g = net.backward(cache, np.ones_like(y))
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    big = [tr for tr in snap.traces if tr.size >= B * H * 8]  # blocks of at least one (B, H) array
    assert len(big) <= 3, f"backward kept {len(big)} separate large allocations"
    assert {a.base.ctypes.data for a in g.weights + g.biases} == {g.flat.ctypes.data}
    assert len({a.base.ctypes.data for a in g.deltas}) == 1


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("name", initializers.names())
def test_init_statistics_follow_the_formula(name):
    fan_in, fan_out, gain = 400, 300, 1.3
    W = jg.MLP.init([fan_in, fan_out], init=name, gain=gain, seed=5).weights[0]
    expected_var = {
        "normal": gain**2 / fan_in,
        "xavier_normal": gain**2 * 2 / (fan_in + fan_out),
        "xavier_uniform": gain**2 * 6 / (fan_in + fan_out) / 3,
        "he_normal": gain**2 * 2 / fan_in,
        "he_uniform": gain**2 * 6 / fan_in / 3,
        "lecun_normal": gain**2 / fan_in,
        "orthogonal": gain**2 / fan_in,  # fan_out orthonormal columns of length fan_in
        "uniform_fan_in": gain**2 / fan_in / 3,
    }[name]
    # 120 000 draws: the sample variance is within 2% of the truth with overwhelming probability
    assert abs(W.var() / expected_var - 1) < 0.02
    assert abs(W.mean()) < 4 * np.sqrt(expected_var / W.size)
    if "uniform" in name:
        assert np.abs(W).max() <= np.sqrt(3 * expected_var)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50), (40, 40)])
def test_orthogonal_init_is_orthonormal_times_gain(shape):
    W = jg.MLP.init(list(shape), init="orthogonal", gain=2.0, seed=1).weights[0]
    small = min(shape)
    G = W.T @ W if shape[0] >= shape[1] else W @ W.T
    np.testing.assert_allclose(G, 4.0 * np.eye(small), atol=1e-12)


def test_same_seed_same_weights_any_dtype():
    a = jg.MLP.init([6, 5, 4], seed=11, bias_std=0.1)
    b = jg.MLP.init([6, 5, 4], seed=11, bias_std=0.1, dtype="float32")
    c = jg.MLP.init([6, 5, 4], seed=12, bias_std=0.1)
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(wa.astype(np.float32), wb)
    assert not np.array_equal(a.weights[0], c.weights[0])


@pytest.mark.gpu
def test_same_seed_same_weights_on_gpu():
    a = jg.MLP.init([6, 5, 4], seed=11, bias_std=0.1)
    g = jg.MLP.init([6, 5, 4], seed=11, bias_std=0.1, device="gpu")
    for wa, wg in zip(a.weights + a.biases, g.weights + g.biases):
        np.testing.assert_array_equal(wa, jg.to_numpy(wg))


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path, rng):
    net = small_net("silu", output="sigmoid")
    path = tmp_path / "net.npz"
    net.save(path)
    back = jg.MLP.load(path)
    x = rng.standard_normal((3, 5))
    np.testing.assert_array_equal(net(x), back(x))
    assert back.activations == net.activations


def test_malformed_weight_files_are_named(tmp_path):
    np.savez(tmp_path / "a.npz", W0=np.ones((3, 2)), W2=np.ones((2, 2)), activations=np.array(["tanh"]))
    with pytest.raises(ValueError, match="W2 present but W1 is missing"):
        jg.MLP.load(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", W0=np.ones((3, 2)))
    with pytest.raises(ValueError, match="no 'activations' array"):
        jg.MLP.load(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        jg.MLP.load(tmp_path / "c.npz")
    np.save(tmp_path / "d.npy", np.ones(3))
    with pytest.raises(ValueError, match="single .npy array"):
        jg.MLP.load(tmp_path / "d.npy")
    np.savez(tmp_path / "e.npz", W0=np.ones((3, 2), dtype=np.int64), activations=np.array(["tanh"]))
    with pytest.raises(ValueError, match="W0 has dtype int64, not floating point"):
        jg.MLP.load(tmp_path / "e.npz")
    with pytest.raises(FileNotFoundError):
        jg.MLP.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- bad input
def test_wrong_feature_count_names_the_layer():
    net = jg.MLP.init([784, 16, 10], seed=0)
    with pytest.raises(ValueError, match="layer 0 expects 784 features, got 700"):
        net.forward(np.zeros((2, 700)))


def test_construction_errors_name_the_layer():
    W = [np.ones((4, 3)), np.ones((5, 2))]
    with pytest.raises(ValueError, match=r"layer 1: W has shape \(5, 2\) but layer 0 outputs 3 features"):
        jg.MLP(W)
    with pytest.raises(ValueError, match=r"layer 1: bias has shape \(3,\) but W has 2 outputs"):
        jg.MLP([np.ones((4, 3)), np.ones((3, 2))], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match="got 3 activations for 2 layers"):
        jg.MLP([np.ones((4, 3)), np.ones((3, 2))], activations=["tanh"] * 3)
    with pytest.raises(KeyError, match="relu"):
        jg.MLP([np.ones((4, 3))], activations="rleu")
    with pytest.raises(KeyError, match="xavier_normal"):
        jg.MLP.init([3, 2], init="glorot")
    with pytest.raises(TypeError, match="dtype int64"):
        jg.MLP([np.ones((4, 3), dtype=np.int64)])


def test_cache_from_another_network_or_batch():
    a, b = small_net(seed=1), small_net(seed=2)
    y, cache = a.forward(np.ones((4, 5)))
    with pytest.raises(ValueError, match="another network"):
        b.backward(cache, np.ones_like(y))
    with pytest.raises(ValueError, match=r"grad_y has shape \(3, 3\) but the cache holds a batch of 4"):
        a.backward(cache, np.ones((3, 3)))


def test_bad_targets_are_named():
    net = small_net()
    with pytest.raises(ValueError, match=r"target has shape \(4, 2\) but the output has shape \(4, 3\)"):
        net.loss_and_grads(np.ones((4, 5)), np.ones((4, 2)), "mse")
    with pytest.raises(ValueError, match="out of range"):
        net.loss_and_grads(np.ones((4, 5)), np.array([0, 1, 2, 3]), "softmax_cross_entropy")
    with pytest.raises(ValueError, match="sigmoid_bce"):
        net.loss_and_grads(np.ones((4, 5)), np.ones((4, 3)), "hinge")


def test_non_finite_values_propagate_or_are_located():
    net = small_net()
    x = np.ones((4, 5))
    x[2, 1] = np.nan
    with np.errstate(invalid="ignore"):
        y, cache = net.forward(x)  # computed, not raised
        g = net.backward(cache, np.ones_like(y))
    assert np.isnan(g.input[2]).any() and np.isfinite(g.input[[0, 1, 3]]).all()
    with pytest.raises(FloatingPointError, match=r"the input x has non-finite values \(first at index \(2, 1\)\)"):
        net.forward(x, check_finite=True)
    big = jg.MLP([np.full((5, 7), 1e200), np.full((7, 3), 1e200)], activations="identity")
    with np.errstate(over="ignore"), pytest.raises(FloatingPointError, match="layer 1: pre-activation h"):
        big.forward(np.ones((2, 5)), check_finite=True)
    y, cache = net.forward(np.ones((4, 5)))
    gy = np.ones_like(y)
    gy[0, 0] = np.inf
    with np.errstate(invalid="ignore"), pytest.raises(FloatingPointError, match="layer 2: gradient"):
        net.backward(cache, gy, check_finite=True)


def test_loss_and_grads_can_skip_the_input_gradient(rng):
    net = small_net()
    x, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    full = net.loss_and_grads(x, t)[1]
    lean = net.loss_and_grads(x, t, input_grad=False)[1]
    assert lean.input is None
    for a, b in zip(full.weights + full.biases, lean.weights + lean.biases):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy", "sigmoid_bce"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_gpu_network_matches_the_float64_numpy_reference(activation, loss, dtype, tol):
    rng = np.random.default_rng(3)
    ref = small_net(activation, sizes=(6, 9, 8, 4))
    gpu = small_net(activation, sizes=(6, 9, 8, 4), dtype=dtype, device="gpu")
    x = rng.standard_normal((7, 6))
    t = rng.integers(0, 4, size=7) if loss == "softmax_cross_entropy" else rng.uniform(0, 1, (7, 4))
    l_ref, g_ref = ref.loss_and_grads(x, t, loss)
    l_gpu, g_gpu = gpu.loss_and_grads(jg.to_device(x, "gpu"), jg.to_device(t, "gpu"), loss)
    assert jg.backend.device_of(g_gpu.weights[0]) == "gpu" and g_gpu.weights[0].dtype == np.dtype(dtype)
    assert relative_error(l_gpu, l_ref) < tol
    for a, b in zip(g_gpu.weights + g_gpu.biases + g_gpu.deltas + [g_gpu.input],
                    g_ref.weights + g_ref.biases + g_ref.deltas + [g_ref.input]):
        assert relative_error(a, b) < tol
    J_gpu = gpu.jacobian_chain(gpu.forward(jg.to_device(x, "gpu"))[1]).jacobian()
    J_ref = ref.jacobian_chain(ref.forward(x)[1]).jacobian()
    assert relative_error(J_gpu, J_ref) < tol
