"""``net.compile_jacobian(B)``: per-sample Jacobians from a static buffer, recorded as a CUDA graph
on the GPU. References: the eager ``jacobian_chain(forward(x)).jacobian(order)`` (the same code:
bitwise) and torch.func's ``vmap(jacrev)`` of the same network (independent); the capture path
against the fake CuPy of ``fake_cupy_calls`` and, for host transfers, ``fake_cupy_transfers``."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from fake_capture import install_recording
from fake_cupy_calls import FakeCupy
from jacgrad.cuda import graphs as _cuda_graph
from jacgrad.steps.compiled_jacobian import JacobianStep
from jacgrad.cuda.graphs import CaptureError, GraphCache

L = jg.layers


def _mlp(dtype="float64", widths=(5, 7, 3, 6, 4), seed=0, to=lambda a: a):
    rng = np.random.default_rng(seed)
    W = [to((rng.standard_normal((m, n)) / np.sqrt(m)).astype(dtype)) for m, n in zip(widths, widths[1:])]
    b = [to((0.2 * rng.standard_normal(n)).astype(dtype)) for n in widths[1:]]
    return jg.MLP(W, b, [("tanh", "gelu", "sigmoid")[j % 3] for j in range(len(W) - 1)] + ["identity"])


def _seq(dtype="float64", seed=1, to=lambda a: a):
    rng = np.random.default_rng(seed)
    a = lambda *s: to((rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype))  # noqa: E731
    g = lambda n: to((1.0 + 0.3 * rng.standard_normal(n)).astype(dtype))  # noqa: E731
    return jg.Sequential([
        L.Dense(a(5, 6), a(6), "gelu"),
        L.Residual([L.LayerNorm(g(6), a(6)), L.Dense(a(6, 6), a(6), "tanh"), L.RMSNorm(g(6))], 0.5),
        L.LayerNorm(g(6), a(6)),
        L.Dense(a(6, 3), a(3)),
    ])


def _eager(net, x, order="auto"):
    return net.jacobian_chain(net.forward(x)[1]).jacobian(order)


@pytest.mark.parametrize("make", [_mlp, _seq], ids=["mlp", "sequential"])
@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_equals_the_eager_jacobian_bitwise(make, order, dtype):
    net = make(dtype)
    rng = np.random.default_rng(3)
    step = net.compile_jacobian(4, order=order)
    for _ in range(2):
        x = rng.standard_normal((4, 5)).astype(dtype)
        J = step(x)
        assert J.shape == (4, net.sizes[-1], 5) and J.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(J, _eager(net, x, order))


@pytest.mark.parametrize("make", [_mlp, _seq], ids=["mlp", "sequential"])
def test_matches_torch_func_vmap_jacrev(make):
    torch = pytest.importorskip("torch")
    net = make()
    x = np.random.default_rng(4).standard_normal((6, 5))
    J = net.compile_jacobian(6)(x, copy=True)
    module = net.to_torch()
    want = torch.func.vmap(torch.func.jacrev(lambda r: module(r[None])[0]))(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(J, want, rtol=1e-12, atol=1e-13)


def test_the_result_is_the_steps_buffer_and_copy_is_fresh():
    net, rng = _mlp(), np.random.default_rng(5)
    step = net.compile_jacobian(3)
    x1, x2 = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    J1 = step(x1)
    kept = step(x1, copy=True)
    J2 = step(x2)
    assert J2 is J1  # overwritten in place, as documented
    assert not np.shares_memory(kept, J1)
    np.testing.assert_array_equal(kept, _eager(net, x1))
    np.testing.assert_array_equal(J2, _eager(net, x2))


def test_a_linear_net_gives_the_shared_jacobian_per_row():
    rng = np.random.default_rng(6)
    net = jg.MLP([rng.standard_normal((4, 3)), rng.standard_normal((3, 2))], [np.zeros(3), np.zeros(2)],
                 ["identity", "identity"])
    J = net.compile_jacobian(5)(rng.standard_normal((5, 4)))
    want = (net.weights[0] @ net.weights[1]).T
    assert J.shape == (5, 2, 4)
    np.testing.assert_allclose(J, np.broadcast_to(want, (5, 2, 4)), rtol=1e-14)


def test_in_place_updates_are_seen_and_replaced_arrays_raise_until_rebind():
    net, rng = _mlp(), np.random.default_rng(7)
    x = rng.standard_normal((2, 5))
    step = net.compile_jacobian(2)
    before = step(x, copy=True)
    net.weights[1] *= 2.0  # in place
    np.testing.assert_array_equal(step(x), _eager(net, x))
    assert not np.array_equal(step(x), before)
    net.weights[0] = net.weights[0] * 0.5
    for _ in range(2):  # raising leaves the step as it was
        with pytest.raises(RuntimeError, match=r"weights\[0\] is no longer what this Jacobian step was compiled"):
            step(x)
    step.rebind()
    np.testing.assert_array_equal(step(x), _eager(net, x))
    net.activations[1] = "relu"
    with pytest.raises(RuntimeError, match=r"activations\[1\]"):
        step(x)
    step.rebind()
    np.testing.assert_array_equal(step(x), _eager(net, x))


def test_a_sequential_names_the_replaced_parameter_and_rebind_checks_shapes():
    net, x = _seq(), np.random.default_rng(8).standard_normal((3, 5))
    step = net.compile_jacobian(3)
    step(x)
    ln = net.layers[2]
    old = ln.gamma
    ln._gamma = old * 2.0  # what a framework swapping arrays would do (no public setter)
    with pytest.raises(RuntimeError, match=r"layer 2 \(LayerNorm\) gamma is no longer"):
        step(x)
    step.rebind()
    np.testing.assert_array_equal(step(x), _eager(net, x))
    ln._gamma = np.ones(7)
    with pytest.raises(ValueError, match=r"layer 2 \(LayerNorm\) gamma is now \(7,\) float64; .*\(6,\)"):
        step.rebind()
    ln._gamma = old
    net._layers = net._layers[:3] + (L.Dense(np.ones((6, 3)), None),)
    with pytest.raises(RuntimeError, match=r"layer 3 \(Dense\) is no longer"):
        step(x)


def test_bad_arguments_and_inputs_are_named():
    net = _mlp()
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        net.compile_jacobian(0)
    with pytest.raises(ValueError, match="order 'sideways' is not one of auto, forward, reverse"):
        net.compile_jacobian(2, order="sideways")
    with pytest.raises(ValueError, match="capture=True records a CUDA graph"):
        net.compile_jacobian(2, capture=True)
    with pytest.raises(ValueError, match="capture must be 'auto', True or False"):
        net.compile_jacobian(2, capture="yes")
    with pytest.raises(TypeError, match="compiles an MLP or a Sequential, not a list"):
        JacobianStep([], 2)
    step = net.compile_jacobian(2)
    with pytest.raises(ValueError, match=r"compiled for batch 2 × 5 features: x must be \(2, 5\), got \(3, 5\)"):
        step(np.zeros((3, 5)))
    with pytest.raises(TypeError, match="x has dtype int64"):
        step(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(TypeError, match="x must be a NumPy array, not list"):
        step([[0.0] * 5] * 2)


def test_no_host_transfer_while_computing_on_a_fake_cupy(monkeypatch):
    """A graph cannot hold a device-to-host read: the whole computation must make none."""
    from fake_cupy_transfers import install

    fake = install(monkeypatch)
    for make in (_mlp, _seq):
        host = make()
        rng = np.random.default_rng(9)
        x = rng.standard_normal((4, 5))
        net = make(to=fake.asarray)
        step = JacobianStep(net, 4, capture=False)
        fake.reset()
        J = step(fake.asarray(x))
        assert fake.transfers == 0, dict(fake.where)
        np.testing.assert_allclose(np.asarray(J.view(np.ndarray)), _eager(host, x), rtol=1e-12, atol=1e-14)


@pytest.fixture
def fake_cupy(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    return cp


def test_recorded_once_and_replayed_then_dropped_by_rebind(fake_cupy):
    net, x = _mlp(), np.random.default_rng(10).standard_normal((3, 5))
    step = net.compile_jacobian(3)
    step._graphs = GraphCache()  # the real cache over the fake CuPy: the step's own code is recorded
    J = step(x)  # eager, then recorded (the fake records by running the computation again)
    np.testing.assert_array_equal(J, _eager(net, x))
    assert fake_cupy.calls == ["stream enter", f"alloc {32 << 20}", "begin_capture", "end_capture", "upload",
                               "stream exit"]
    step(x)
    assert fake_cupy.calls[-1] == "launch" and len(step._graphs) == 1 and step.captured
    net.weights[0] = net.weights[0] + 0.0
    step.rebind()  # drops the graph, waiting for the device first
    assert len(step._graphs) == 0 and "synchronize" in fake_cupy.calls


def test_a_failed_capture_falls_back_under_auto_and_raises_under_true(monkeypatch):
    cp = FakeCupy(fail_at={"end_capture"})
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    net, rng = _seq(), np.random.default_rng(11)
    step = net.compile_jacobian(2)
    step._graphs = GraphCache()
    for _ in range(2):  # the failing call returns the eager result; later calls run without a graph
        x = rng.standard_normal((2, 5))
        np.testing.assert_array_equal(step(x), _eager(net, x))
    assert not step.captured and "end_capture failed" in step.capture_error
    strict = net.compile_jacobian(2, capture=False)
    strict._capture, strict._graphs = True, GraphCache()
    with pytest.raises(CaptureError, match="end_capture failed"):
        strict(rng.standard_normal((2, 5)))


# ---------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("widths", [(512, 256, 128, 64, 10), (64, 64, 8, 64, 64)], ids=["tapering", "hourglass"])
def test_gpu_replays_match_the_float64_numpy_reference(dtype, tol, widths):
    import cupy as cp

    host = _mlp("float64", widths=widths, seed=12)
    net = _mlp(dtype, widths=widths, seed=12, to=cp.asarray)
    rng = np.random.default_rng(13)
    step = net.compile_jacobian(32)
    for call in range(3):  # 0: eager, then recorded; 1, 2: replays, a weight updated in place between
        x = rng.standard_normal((32, widths[0]))
        got = cp.asnumpy(step(cp.asarray(x.astype(dtype))))
        want = _eager(host, x.astype(dtype).astype(np.float64))
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), (call, step.capture_error)
        net.weights[1] *= 0.9
        host.weights[1] *= 0.9
    # the tapering net's plan has only 2-D products; the hourglass multiplies two per-sample stacks
    # (split at the bottleneck): recorded as cublasGemmStridedBatchedEx
    assert step.captured, step.capture_error


# ---------------------------------------------------------------------- what a recording runs, on the host
@pytest.mark.parametrize("make,kind,widths", [
    (_mlp, "tapering", (40, 24, 12, 6, 3)),
    (_mlp, "hourglass", (12, 12, 12, 2, 12, 12, 12)),
    (_seq, "blocks", None),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_while_recording_every_product_goes_through_jacgrads_cublas_calls(monkeypatch, make, kind, widths, dtype):
    """Inside ``direct_cublas()`` (what a capture runs), on a fake CuPy: no product may reach
    ``cupy.matmul`` (CuPy refuses cuBLAS under capture), and the cuBLAS calls jacgrad makes instead
    — ``cublasGemmEx``, ``cublasGemmStridedBatchedEx`` for the hourglass's two per-sample stacks —
    carried out by the BLAS definition give the eager Jacobian."""
    from jacgrad.cuda import gemm as _gemm

    fake = install_recording(monkeypatch, AssertionError, "a product reached cupy.matmul while recording")
    host = fake.host
    kw = {} if widths is None else {"widths": widths}
    ref, net = make("float64", **kw), make(dtype, to=fake.asarray, **kw)
    n_in = ref.sizes[0]
    x = np.random.default_rng(14).standard_normal((5, n_in)).astype(dtype)
    step = JacobianStep(net, 5, capture=False)
    step(fake.asarray(np.zeros_like(x)))  # the first call makes the output buffer, outside the block
    step._x[...] = fake.asarray(x)
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run()
    got = np.asarray(step._out.view(np.ndarray))
    want = _eager(ref, x.astype(np.float64))
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
    assert host.calls and ("strided batched" in host.calls) == (kind == "hourglass"), host.calls
