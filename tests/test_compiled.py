"""TrainingStep (net.compile): the numbers of loss_and_grads from buffers allocated once;
on the GPU, replayed as a CUDA graph without waiting for the device."""

import tracemalloc

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.steps.compiled import TrainingStep

# (loss, target kind): every compiled loss and both target forms of softmax cross-entropy
LOSSES = [("mse", "float"), ("sigmoid_bce", "float"), ("softmax_cross_entropy", "labels"),
          ("softmax_cross_entropy", "rows")]
# tanh / sigmoid / relu keep y (φ' from the output); gelu / silu / softplus keep h and z
ACTIVATIONS = ["tanh", "relu", "gelu", "softplus"]


def _target(rng, kind, B, C, dtype, xp=np):
    if kind == "labels":
        t = rng.integers(0, C, B)
    elif kind == "rows":
        t = rng.dirichlet(np.ones(C), B).astype(dtype)
    else:
        t = rng.random((B, C)).astype(dtype)
    return xp.asarray(t)


def _arrays(loss, g):
    return [loss, *g.weights, *g.biases, *g.deltas] + ([g.input] if g.input is not None else [])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss,kind", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_step_is_bitwise_loss_and_grads_across_calls_and_sgd_updates(rng, dtype, loss, kind, activation):
    net = jg.MLP.init([7, 9, 8, 5], activation=activation, bias_std=0.1, seed=1, dtype=dtype)
    step = net.compile(6, loss=loss, input_grad=True)
    for _ in range(3):
        x = rng.standard_normal((6, 7)).astype(dtype)
        t = _target(rng, kind, 6, 5, dtype)
        got = _arrays(*step(x, t))
        want = _arrays(*net.loss_and_grads(x, t, loss=loss))
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)  # same operations in the same order: bitwise
        g = step(x, t)[1]
        for W, b, dW, db in zip(net.weights, net.biases, g.weights, g.biases):  # SGD in place
            W -= 0.1 * dW
            b -= 0.1 * db


def test_wide_layers_stay_bitwise_and_input_grad_is_optional(rng):
    net = jg.MLP.init([300, 257, 130], activation="tanh", seed=2)
    x, t = rng.standard_normal((64, 300)), rng.random((64, 130))
    loss, g = net.compile(64)(x, t)
    ref_loss, ref = net.loss_and_grads(x, t)
    assert g.input is None and loss == ref_loss
    for a, b in zip(g.weights + g.biases, ref.weights + ref.biases):
        np.testing.assert_array_equal(a, b)


def test_results_are_the_step_buffers_unless_copied(rng):
    net = jg.MLP.init([4, 6, 3], seed=0)
    step = net.compile(5)
    x1, x2, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), rng.random((5, 3))
    loss1, g1 = step(x1, t)
    kept_loss, kept = step(x1, t, copy=True)
    loss2, g2 = step(x2, t)
    assert loss2 is loss1 and all(a is b for a, b in zip(g1.weights, g2.weights))  # overwritten in place
    assert all(a is b for a, b in zip(g1.deltas, g2.deltas)) and g1.biases[0] is g2.biases[0]
    ref_loss, ref = net.loss_and_grads(x1, t)
    assert kept_loss == ref_loss and kept_loss is not loss2
    for a, b in zip(kept.weights, ref.weights):
        np.testing.assert_array_equal(a, b)
    assert g2.flat is g1.flat and kept.flat is not g2.flat
    np.testing.assert_array_equal(kept.flat, ref.flat)  # the copy keeps the flat layout and its views
    assert all(np.shares_memory(a, kept.flat) for a in kept.weights + kept.biases)
    g2.weights.clear()  # the returned lists are the caller's: the step keeps its own
    assert len(step(x2, t)[1].weights) == 2


def test_replacing_a_weight_array_or_an_activation_is_detected_and_rebind_adopts_it(rng):
    net = jg.MLP.init([4, 6, 3], seed=0, bias_std=0.1)
    step = net.compile(5, input_grad=True)
    x, t = rng.standard_normal((5, 4)), rng.random((5, 3))
    step(x, t)

    def replace(lst, j, value):
        lst[j] = value

    changes = [  # a new array, not an in-place update; then activations that keep h (gelu) or y (relu)
        (lambda: replace(net.weights, 1, net.weights[1] * 0.5), r"net.weights\[1\] is no longer the array"),
        (lambda: replace(net.activations, 0, "gelu"), r"net.activations\[0\] is now 'gelu'"),
        (lambda: replace(net.activations, 0, "relu"), r"net.activations\[0\] is now 'relu'"),
    ]
    for change, match in changes:
        change()
        with pytest.raises(RuntimeError, match=match + ".*rebind"):
            step(x, t)
        step.rebind()
        got = _arrays(*step(x, t))
        for a, b in zip(got, _arrays(*net.loss_and_grads(x, t)), strict=True):
            np.testing.assert_array_equal(a, b)
    net.biases[0] = np.zeros(6)
    with pytest.raises(RuntimeError, match=r"net.biases\[0\]"):
        step(x, t)
    with pytest.raises(ValueError, match=r"layer 0: bias has shape \(7,\)"):  # the net refuses a wrong shape itself
        net.biases[0] = np.zeros(7)


def test_a_duck_typed_network_with_plain_lists_is_compiled_and_rebind_checks_its_shapes(rng):
    """TrainingStep reads a net through its lists (compiled does not import mlp): plain Python
    lists, whose entries nothing validates, get the step's own checks."""
    ref = jg.MLP.init([4, 6, 3], seed=0, bias_std=0.1)

    class Plain:
        weights, biases, activations = list(ref.weights), list(ref.biases), list(ref.activations)
        xp, sizes, dtype = np, ref.sizes, ref.dtype

    net = Plain()
    step = TrainingStep(net, 5)
    x, t = rng.standard_normal((5, 4)), rng.random((5, 3))
    loss, g = step(x, t)
    ref_loss, want = ref.loss_and_grads(x, t)
    assert loss == ref_loss and np.array_equal(g.flat, want.flat)
    net.biases[0] = np.zeros(7)
    with pytest.raises(RuntimeError, match=r"net.biases\[0\] is no longer the array"):
        step(x, t)
    with pytest.raises(ValueError, match=r"net.biases\[0\] is now \(7,\) float64.*compiled for \(6,\)"):
        step.rebind()


def test_inputs_are_validated_with_the_compiled_shape():
    net = jg.MLP.init([784, 16, 10], seed=0, dtype="float32")
    step = net.compile(64, loss="softmax_cross_entropy")
    x, labels = np.zeros((64, 784), np.float32), np.zeros(64, np.int64)
    with pytest.raises(ValueError, match=r"compiled for batch 64 × 784 features: x must be \(64, 784\), got \(32, 784\)"):
        step(np.zeros((32, 784), np.float32), labels)
    with pytest.raises(TypeError, match="x has dtype int64"):
        step(np.zeros((64, 784), np.int64), labels)
    with pytest.raises(TypeError, match="x must be a NumPy array, not list"):
        step([[0.0] * 784] * 64, labels)
    with pytest.raises(ValueError, match=r"int labels \(64,\) or rows \(64, 10\), got \(63,\)"):
        step(x, np.zeros(63, np.int64))
    with pytest.raises(ValueError, match=r"label 10 is out of range for C=10"):
        step(x, np.full(64, 10))
    with pytest.raises(TypeError, match="labels must be integers"):
        step(x, np.zeros(64, np.float32))
    with pytest.raises(ValueError, match=r"got \(64, 9\)"):
        step(x, np.zeros((64, 9), np.float32))
    mse = net.compile(64)
    with pytest.raises(ValueError, match=r"batch 64 × 10 outputs: the target must be \(64, 10\), got \(64, 11\)"):
        mse(x, np.zeros((64, 11), np.float32))
    with pytest.raises(TypeError, match="target has dtype int64"):
        mse(x, np.zeros((64, 10), np.int64))


def test_float64_input_is_refused_like_forward_and_float32_input_runs(rng):
    net = jg.MLP.init([4, 6, 3], seed=0, dtype="float32")
    x, t = rng.standard_normal((5, 4)), rng.random((5, 3))  # float64 data, float32 network
    step = net.compile(5)
    for call in (lambda: step(x, t), lambda: net.loss_and_grads(x, t)):
        with pytest.raises(TypeError, match=r"x is float64 but the network is float32.*x.astype\(np.float32\)"):
            call()
    loss, g = step(x.astype(np.float32), t)  # the target is cast as the losses cast it
    ref_loss, ref = net.loss_and_grads(x.astype(np.float32), t)
    assert loss.dtype == np.float32 and loss == ref_loss
    np.testing.assert_array_equal(g.weights[0], ref.weights[0])


def test_construction_errors():
    net = jg.MLP.init([4, 6, 3], seed=0)
    with pytest.raises(ValueError, match="capture=True records a CUDA graph.*CPU"):
        net.compile(5, capture=True)
    with pytest.raises(ValueError, match="capture must be 'auto', True or False"):
        net.compile(5, capture="yes")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        net.compile(0)
    with pytest.raises(ValueError, match="valid names"):
        net.compile(5, loss="hinge")
    with pytest.raises(TypeError, match="compiles an MLP"):
        TrainingStep(object(), 5)
    step = net.compile(5, capture=False)
    assert not step.captured and step.graph_pool_bytes == 0 and not net.compile(5).captured
    B = 5
    buffers = B * 4 + B * 3 + B * (6 + 3) * 2 + (4 * 6 + 6 * 3) + (6 + 3)  # x, target, y_j, δ_j, dW, db
    assert step.nbytes >= 8 * buffers and "buffers" in repr(step)


def test_steady_state_call_allocates_nothing_lasting(rng):
    B, H = 32, 128
    net = jg.MLP.init([H] * 6, activation="tanh", seed=0, dtype="float32")
    step = net.compile(B)
    x, t = rng.standard_normal((B, H)).astype(np.float32), rng.random((B, H)).astype(np.float32)
    for _ in range(3):
        step(x, t)
    tracemalloc.start()
    try:
        for _ in range(5):
            step(x, t)
        retained, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        net.loss_and_grads(x, t)
        _, ref_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    layer = B * H * 4
    # What stays: the returned Gradients' lists (~1-3 KB). The transient peak is the activation
    # table's own temporaries for one layer (tanh: a few B×H arrays), not per-layer results.
    assert retained < 4096
    assert peak < 8 * layer < ref_peak


def test_layer_factor_products_accept_out(rng):
    J = jg.LayerJacobian.from_activation("tanh", rng.standard_normal((4, 3)), y=np.tanh(rng.standard_normal((5, 3))))
    delta, u = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))
    out_in, out_out = np.empty((5, 4)), np.empty((5, 3))
    assert J.through_weights_t(delta, out=out_in) is out_in
    np.testing.assert_array_equal(out_in, J.through_weights_t(delta))
    assert J.jvp(u, out=out_out) is out_out
    np.testing.assert_array_equal(out_out, J.jvp(u))
    with pytest.raises(ValueError, match=r"through_weights_t: out is \(5, 3\) float64 but the result is \(5, 4\) float64"):
        J.through_weights_t(delta, out=out_out)
    with pytest.raises(ValueError, match="float32 but the result is"):
        J.jvp(u, out=out_out.astype(np.float32))


class _RefusedCapture:
    """Stands in for _cuda_graph.GraphCache where the capture fails (as CuPy's cuBLAS refusal does):
    runs the step eagerly, then raises CaptureError like GraphCache.run."""

    def __init__(self):
        self.cleared = 0

    def run(self, key, fn):
        from jacgrad.cuda.graphs import CaptureError

        fn()
        raise CaptureError("capturing the training step into a CUDA graph failed (NotImplementedError: "
                           "calling cuBLAS API during stream capture is currently unsupported)")

    def clear(self):
        self.cleared += 1


def test_a_refused_capture_falls_back_under_auto_and_raises_under_true(rng):
    from jacgrad.cuda.graphs import CaptureError

    net = jg.MLP.init([4, 6, 3], seed=0)
    x, t = rng.standard_normal((5, 4)), rng.random((5, 3))
    ref_loss, ref = net.loss_and_grads(x, t)
    step = net.compile(5)
    step._graphs = fake = _RefusedCapture()  # as on a GPU whose CuPy refuses cuBLAS under capture
    assert step.captured and step.capture_error is None
    for _ in range(2):  # the failing call returns the eager results; later calls run without a graph
        loss, g = step(x, t)
        assert loss == ref_loss and all(np.array_equal(a, b) for a, b in zip(g.weights, ref.weights))
    assert not step.captured and "cuBLAS" in step.capture_error and fake.cleared == 1
    strict = net.compile(5, capture=False)
    strict._capture, strict._graphs = True, _RefusedCapture()
    with pytest.raises(CaptureError, match="cuBLAS"):
        strict(x, t)


def test_tf32_switch_is_a_setter_and_a_context_manager(monkeypatch):
    monkeypatch.setattr(jg.backend, "_TF32", [False])
    monkeypatch.setattr(jg.backend, "_TF32_NOOP_WARNED", [False])
    monkeypatch.setattr(jg.backend, "gpu_available", lambda: False)
    monkeypatch.setattr(jg.backend, "gpu_unavailable_reason", lambda: "no GPU in this test")
    with pytest.warns(UserWarning, match="only changes float32 matrix products on CuPy"):
        with jg.backend.tf32(True):
            assert jg.backend.tf32_enabled()
    assert not jg.backend.tf32_enabled()
    jg.backend.tf32(True)  # as a setter; warns only once per process
    assert jg.backend.tf32_enabled()
    jg.backend.tf32(False)
    assert not jg.backend.tf32_enabled()


# ---------------------------------------------------------------------- GPU


def _gpu_case(rng, dtype="float32", sizes=(32, 64, 64, 10), B=16, activation="tanh"):
    cp = pytest.importorskip("cupy")
    host = jg.MLP.init(list(sizes), activation=activation, bias_std=0.1, seed=3, dtype="float64")
    net = jg.MLP([cp.asarray(W.astype(dtype)) for W in host.weights],
                 [cp.asarray(b.astype(dtype)) for b in host.biases], host.activations)
    x = rng.standard_normal((B, sizes[0]))
    t = rng.random((B, sizes[-1]))
    return cp, host, net, x, t


def _warm_gpu_step(rng):
    """A compiled float32 GPU step after its warm-up call and one replay: (cp, host, net, step, x, t)."""
    cp, host, net, x, t = _gpu_case(rng)
    step = net.compile(16)
    xd, td = cp.asarray(x.astype(np.float32)), cp.asarray(t.astype(np.float32))
    step(xd, td)
    step(xd, td)
    return cp, host, net, step, xd, td


def _rel(a, b):
    a, b = jg.to_numpy(a).astype(np.float64), jg.to_numpy(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("loss,kind", LOSSES)
def test_gpu_graph_replays_match_the_float64_reference(rng, dtype, tol, loss, kind):
    cp, host, net, x, _ = _gpu_case(rng, dtype)
    # "auto": the step's GEMMs call cuBLAS directly while recording (CuPy refuses its own under capture)
    step, eager = net.compile(16, loss=loss), net.compile(16, loss=loss, capture=False)
    assert step.captured and not eager.captured
    for call in range(3):  # call 0: warm-up + capture; then replays; weights updated in place between
        t = _target(rng, kind, 16, 10, dtype)
        xd, td = cp.asarray(x.astype(dtype)), cp.asarray(t)
        loss_g, g = step(xd, td)
        loss_e, e = eager(xd, td)
        ref_loss, ref = host.loss_and_grads(x, t, loss=loss)
        assert isinstance(loss_g, cp.ndarray) and loss_g.shape == ()
        assert _rel(loss_g, ref_loss) < tol
        for a, b, r in zip(g.weights + g.biases, e.weights + e.biases, ref.weights + ref.biases):
            assert _rel(a, r) < tol and _rel(a, b) < tol
        for Wd, Wh, dW in zip(net.weights, host.weights, g.weights):
            Wh -= 0.01 * jg.to_numpy(dW).astype(np.float64)
            Wd[...] = cp.asarray(Wh.astype(dtype))  # in place: the graph reads the same address
    assert step.captured, step.capture_error


@pytest.mark.gpu
def test_gpu_capture_records_the_gemms_through_direct_cublas(rng):
    cp, host, net, x, t = _gpu_case(rng)
    xd, td = cp.asarray(x.astype(np.float32)), cp.asarray(t.astype(np.float32))
    strict = net.compile(16, capture=True)  # raises CaptureError if recording fails
    first = strict(xd, td, copy=True)[1]
    replay = strict(xd, td, copy=True)[1]
    assert strict.captured and strict.capture_error is None and len(strict._graphs) == 1
    for a, b in zip(first.weights, replay.weights):  # eager cupy.matmul vs recorded cublasGemmEx
        assert _rel(b, jg.to_numpy(a).astype(np.float64)) < 1e-6


@pytest.mark.gpu
def test_gpu_step_returns_without_waiting_for_the_device(rng):
    cp, _, _, step, xd, td = _warm_gpu_step(rng)
    cp.cuda.Device().synchronize()
    spin = cp.RawKernel(
        'extern "C" __global__ void spin(long long n) { long long t0 = clock64(); while (clock64() - t0 < n) {} }',
        "spin")
    spin((1,), (1,), (np.int64(3_000_000_000),))  # ~1-2 s of one busy thread on the current stream
    loss, g = step(xd, td)
    assert not cp.cuda.get_current_stream().done  # the step was queued behind it, not waited for
    cp.cuda.Device().synchronize()
    assert np.isfinite(float(loss))


@pytest.mark.gpu
def test_gpu_tf32_recaptures_and_stays_within_its_documented_error(rng):
    cp, host, net, x, t = _gpu_case(rng, sizes=(256, 512, 512, 64), B=128)
    step = net.compile(128)
    xd, td = cp.asarray(x.astype(np.float32)), cp.asarray(t.astype(np.float32))
    ref = host.loss_and_grads(x, t)[1]
    step(xd, td)
    full = [_rel(a, r) for a, r in zip(step(xd, td, copy=True)[1].weights, ref.weights)]
    with jg.backend.tf32(True):
        step(xd, td)  # a new key: warm-up and capture with the TF32 compute type
        tf32 = [_rel(a, r) for a, r in zip(step(xd, td, copy=True)[1].weights, ref.weights)]
    assert step.captured and len(step._graphs) == 2, step.capture_error
    assert max(full) < 1e-5 and max(tf32) < 1e-2  # tf32: ~2^-11 per GEMM, a few GEMMs deep


@pytest.mark.gpu
def test_gpu_rebind_recaptures_and_device_mixing_is_refused(rng):
    cp, _, net, step, xd, td = _warm_gpu_step(rng)
    net.weights[0] = net.weights[0] * 1.0
    with pytest.raises(RuntimeError, match="rebind"):
        step(xd, td)
    step.rebind()
    assert step.captured and len(step._graphs) == 0, step.capture_error
    loss, _ = step(xd, td)
    assert abs(float(loss) - float(net.loss_and_grads(xd, td)[0])) < 1e-6
    with pytest.raises(TypeError, match="NumPy \\(CPU\\) array but this step runs on the GPU"):
        step(cp.asnumpy(xd), td)
    with pytest.raises(ValueError, match="capture=True"):
        jg.MLP.init([3, 2]).compile(4, capture=True)
