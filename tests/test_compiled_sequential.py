"""Sequential.compile (SequentialStep): the numbers of loss_and_grads, bitwise on NumPy, from
buffers allocated once; torch autograd agrees; parameters read by reference; replaced arrays,
bad inputs and failed captures handled like MLP.compile's TrainingStep."""

import tracemalloc

import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_calls import FakeCupy
from jacgrad.cuda import graphs as _cuda_graph
from jacgrad.steps.compiled_sequential import SequentialStep
from jacgrad.cuda.graphs import CaptureError, GraphCache

L = jg.layers
LOSSES = [("mse", "float"), ("sigmoid_bce", "float"), ("softmax_cross_entropy", "labels"),
          ("softmax_cross_entropy", "rows")]


def _net(dtype="float64", seed=0, scale=0.7):
    """Dense (gelu: keeps h and z) -> residual (LayerNorm, Dense tanh, RMSNorm) -> LayerNorm ->
    RMSNorm -> Dense: every layer kind, norms inside and outside a block, non-trivial γ and β."""
    rng = np.random.default_rng(seed)
    a = lambda *s: rng.standard_normal(s).astype(dtype)
    g = lambda n: (1.0 + 0.3 * rng.standard_normal(n)).astype(dtype)
    return jg.Sequential([
        L.Dense(a(5, 6) / 2, a(6) / 5, "gelu"),
        L.Residual([L.LayerNorm(g(6), a(6) / 5), L.Dense(a(6, 6) / 3, a(6) / 5, "tanh"), L.RMSNorm(g(6))], scale),
        L.LayerNorm(g(6), a(6) / 5),
        L.Dense(a(6, 6) / 3, None, "sigmoid"),
        L.RMSNorm(g(6)),
        L.Dense(a(6, 3) / 3, a(3) / 5),
    ])


def _target(rng, kind, B, C, dtype):
    if kind == "labels":
        return rng.integers(0, C, B)
    if kind == "rows":
        return rng.dirichlet(np.ones(C), B).astype(dtype)
    return rng.random((B, C)).astype(dtype)


def _arrays(loss, g):
    return [loss, g.flat, *g.deltas] + ([g.input] if g.input is not None else [])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss,kind", LOSSES)
@pytest.mark.parametrize("scale", [0.7, 1.0])  # 1.0: the residual block skips its scaling pass
def test_step_is_bitwise_loss_and_grads_across_calls_and_sgd_updates(rng, dtype, loss, kind, scale):
    net = _net(dtype, scale=scale)
    step = net.compile(7, loss=loss)
    assert isinstance(step, SequentialStep) and step.input_grad
    for _ in range(3):
        x = rng.standard_normal((7, 5)).astype(dtype)  # float64 into a float32 net is refused: cast here
        t = _target(rng, kind, 7, 3, dtype)
        got = _arrays(*step(x, t))
        want = _arrays(*net.loss_and_grads(x, t, loss=loss))
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        _, g = step(x, t)
        for lay, grads in zip(net.layers, g.layers):  # SGD in place on every parameter, γ and β too
            for sub, gr in ([(lay, grads)] if not isinstance(lay, L.Residual) else zip(lay.layers, grads)):
                for p, name in zip(sub.params, sub.names):
                    p -= 0.1 * gr[name]


def test_named_gradients_are_views_of_flat_and_input_grad_is_optional(rng):
    net = _net()
    step = net.compile(4, input_grad=False)
    x, t = rng.standard_normal((4, 5)), rng.random((4, 3))
    loss, g = step(x, t)
    ref_loss, ref = net.loss_and_grads(x, t, input_grad=False)
    assert g.input is None and loss == ref_loss
    np.testing.assert_array_equal(g.flat, ref.flat)
    assert np.shares_memory(g.layers[1][0]["gamma"], g.flat) and np.shares_memory(g.layers[5]["W"], g.flat)
    np.testing.assert_array_equal(g.layers[2]["beta"], ref.layers[2]["beta"])
    np.testing.assert_array_equal(g.layers[1][2]["gamma"], ref.layers[1][2]["gamma"])


@pytest.mark.parametrize("scale", [0.7, 1.0])
def test_matches_torch_autograd(scale):
    torch = pytest.importorskip("torch")
    from test_layers_torch import _torch_net

    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        tnet, net, order = _torch_net(dtype, scale)
        rng = np.random.default_rng(7)
        x, t = rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal((5, 2)).astype(dtype)
        loss, g = net.compile(5)(x, t)
        xt = torch.tensor(x, requires_grad=True)
        lt = torch.nn.functional.mse_loss(tnet(xt), torch.tensor(t))
        lt.backward()
        want = []
        for m in order:
            if isinstance(m, torch.nn.Linear):
                want += [m.weight.grad.numpy().T.ravel(), m.bias.grad.numpy()]
            else:
                want += [m.weight.grad.numpy()] + ([m.bias.grad.numpy()] if getattr(m, "bias", None) is not None else [])
        want = np.concatenate(want).astype(np.float64)
        scale = max(1.0, np.abs(want).max())
        assert abs(float(loss) - lt.item()) <= tol * max(1.0, abs(lt.item()))
        assert np.abs(g.flat - want).max() / scale <= tol
        assert np.abs(g.input - xt.grad.numpy()).max() / max(1.0, np.abs(xt.grad.numpy()).max()) <= tol


def test_results_are_the_step_buffers_unless_copied(rng):
    net = _net()
    step = net.compile(4)
    x1, x2, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), rng.random((4, 3))
    loss1, g1 = step(x1, t)
    kept = step(x1, t, copy=True)
    snapshot = [a.copy() for a in _arrays(*kept)]
    loss2, g2 = step(x2, t)
    assert g2.flat is g1.flat and loss2 is loss1 and g2.input is g1.input  # the same buffers, overwritten
    assert all(a is b for a, b in zip(g1.deltas, g2.deltas))
    for a, b in zip(_arrays(*kept), snapshot):  # the copies are untouched
        np.testing.assert_array_equal(a, b)
    copies = _arrays(*kept)
    owned = [step._flat, step._x, step._target, step._loss.grad, step._loss.value]
    owned += [a for bufs in step._fbufs + step._bbufs for a in bufs]
    assert not any(np.shares_memory(c, o) for c in copies for o in owned)
    assert np.shares_memory(kept[1].layers[0]["W"], kept[1].flat)
    assert not any(np.shares_memory(r, a) for r in _arrays(*step(x1, t)) for a in (x1, t))  # never the caller's


def test_a_replaced_parameter_is_detected_and_rebind_adopts_it(rng):
    net = _net()
    step = net.compile(3)
    x, t = rng.standard_normal((3, 5)), rng.random((3, 3))
    before = step(x, t, copy=True)
    ln, inner = net.layers[2], net.layers[1].layers[1]
    old_gamma, old_W = ln.gamma, inner.W
    ln._gamma = old_gamma * 2.0  # no public setter: what a framework swapping arrays would do
    for _ in range(2):  # the error leaves the step as it was: it raises again, and runs nothing
        with pytest.raises(RuntimeError, match=r"layer 2 \(LayerNorm\) gamma is no longer the array .*step\.rebind\(\)"):
            step(x, t)
    step.rebind()
    loss, g = step(x, t)
    ref_loss, ref = net.loss_and_grads(x, t)
    assert loss == ref_loss and np.array_equal(g.flat, ref.flat) and not np.array_equal(g.flat, before[1].flat)
    inner._W = old_W.copy()
    with pytest.raises(RuntimeError, match=r"layer 1\.1 \(Dense\) W is no longer"):
        step(x, t)
    ln._gamma = np.ones(7)  # another shape: rebind refuses it, naming the parameter, and keeps the old binding
    with pytest.raises(ValueError, match=r"layer 2 \(LayerNorm\) gamma is now \(7,\) float64 .*compiled for \(6,\)"):
        step.rebind()
    ln._gamma, inner._W = old_gamma, old_W
    with pytest.raises(RuntimeError, match="no longer the array"):  # still bound to the doubled gamma
        step(x, t)
    step.rebind()
    np.testing.assert_array_equal(step(x, t)[1].flat, before[1].flat)


def test_a_replaced_layer_is_detected():
    net = _net()
    step = net.compile(2)
    net._layers = net._layers[:3] + (L.Dense(np.ones((6, 6)), None, "sigmoid"),) + net._layers[4:]
    with pytest.raises(RuntimeError, match="layer 3 of the network is no longer the layer"):
        step(np.ones((2, 5)), np.ones((2, 3)))
    step.rebind()  # same kinds and widths: adopted
    step(np.ones((2, 5)), np.ones((2, 3)))
    net._layers = net._layers[:3] + (L.Dense(np.ones((6, 6)), None, "gelu"),) + net._layers[4:]
    with pytest.raises(ValueError, match="whose buffers differ from those this step was compiled for"):
        step.rebind()  # gelu keeps h and z: other forward buffers than sigmoid's
    net._layers = net._layers[:-1] + (L.Dense(np.ones((6, 3)), None, "tanh"), L.Dense(np.ones((3, 3))))
    with pytest.raises(ValueError, match="compile a new step"):
        step.rebind()


def test_bad_inputs_are_clear_errors_and_leave_the_step_usable(rng):
    net = _net()
    step = net.compile(4, loss="softmax_cross_entropy")
    x, t = rng.standard_normal((4, 5)), rng.integers(0, 3, 4)
    want_loss, want = step(x, t, copy=True)
    with pytest.raises(ValueError, match=r"compiled for batch 4 × 5 features: x must be \(4, 5\), got \(3, 5\)"):
        step(x[:3], t)
    with pytest.raises(ValueError, match=r"compiled for batch 4 × 3 classes.*got \(5,\)"):
        step(x, rng.integers(0, 3, 5))
    with pytest.raises(TypeError, match="labels must be integers but the target is a float64 array"):
        step(x, t.astype(np.float64))
    with pytest.raises(ValueError, match=r"label 3 is out of range for C=3 classes"):
        step(x, np.array([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="x must be a NumPy array, not list"):
        step([[0.0] * 5] * 4, t)
    loss, g = step(x, t)
    assert loss == want_loss and np.array_equal(g.flat, want.flat)
    mse = net.compile(4)
    with pytest.raises(TypeError):
        mse(x, np.full((4, 3), "a"))  # a string target for a float loss
    with pytest.raises(ValueError, match=r"batch must be a positive integer, got 0"):
        net.compile(0)
    with pytest.raises(ValueError, match="hinge"):
        net.compile(4, loss="hinge")
    with pytest.raises(ValueError, match="capture=True records a CUDA graph, which needs a network on the GPU"):
        net.compile(4, capture=True)
    with pytest.raises(TypeError, match="TrainingStep compiles an MLP .* or a Sequential"):
        SequentialStep(object(), 2)


@pytest.mark.parametrize("act", ["tanh", "gelu"])  # φ' from the output; φ'(h) kept by the forward pass
def test_an_mlp_compiles_through_the_one_step_and_matches_its_eager_gradients_bitwise(rng, act):
    """issue 19: MLP is a Dense-only Sequential with one compiled step (SequentialStep is its old name)."""
    net = jg.MLP.init([5, 7, 6, 3], activation=act, seed=0, bias_std=0.1)
    step = SequentialStep(net, 4, input_grad=True)
    assert type(net.compile(4)) is type(step) is type(_net().compile(2))
    x, t = rng.standard_normal((4, 5)), rng.random((4, 3))
    loss, g = step(x, t)
    ref_loss, ref = net.loss_and_grads(x, t, input_grad=True)
    assert loss == ref_loss and np.array_equal(g.flat, ref.flat) and np.array_equal(g.input, ref.input)
    for a, b in zip(g.weights + g.biases + g.deltas, ref.weights + ref.biases + ref.deltas, strict=True):
        np.testing.assert_array_equal(a, b)


def test_steady_state_call_allocates_nothing_lasting(rng):
    B, H = 32, 128
    layers = [L.Dense(rng.standard_normal((H, H)).astype(np.float32) / 12, None, "tanh")]
    for _ in range(3):
        layers.append(L.Residual([L.LayerNorm(np.ones(H, np.float32)),
                                  L.Dense(rng.standard_normal((H, H)).astype(np.float32) / 12, None, "tanh")]))
    net = jg.Sequential(layers + [L.RMSNorm(np.ones(H, np.float32))])
    step = net.compile(B)
    x, t = rng.standard_normal((B, H)).astype(np.float32), rng.random((B, H)).astype(np.float32)
    step(x, t)
    retained, peak = _traced(lambda: step(x, t), 5)
    _, plain_peak = _traced(lambda: net.loss_and_grads(x, t), 1)
    layer = B * H * 4
    assert retained < 8192  # the returned BlockGradients' lists and dicts
    assert peak < 4 * layer < plain_peak  # the tanh table's temporaries, not per-layer arrays


def _traced(fn, calls: int):
    """``(bytes still held, peak bytes)`` that ``calls`` calls of ``fn`` allocated, by tracemalloc."""
    tracemalloc.start()
    try:
        for _ in range(calls):
            fn()
        return tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- the CUDA-graph path, faked
@pytest.fixture
def fake_cupy(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    return cp


def test_the_step_is_captured_once_per_target_kind_and_replayed(fake_cupy, rng):
    net = _net()
    step = net.compile(5, loss="softmax_cross_entropy")
    step._graphs = GraphCache()  # the real cache over the fake CuPy: the step's own code is recorded
    x, rows, labels = rng.standard_normal((5, 5)), rng.dirichlet(np.ones(3), 5), rng.integers(0, 3, 5)
    want_loss, want = net.loss_and_grads(x, rows, loss="softmax_cross_entropy")
    loss, g = step(x, rows)  # eager, then recorded (the fake records by running the step again)
    assert loss == want_loss and np.array_equal(g.flat, want.flat)
    assert fake_cupy.calls == ["stream enter", f"alloc {32 << 20}", "begin_capture", "end_capture", "upload",
                               "stream exit"]
    step(x, rows)
    assert fake_cupy.calls[-1] == "launch" and len(step._graphs) == 1
    step(x, labels)  # another target kind: its own graph
    assert len(step._graphs) == 2 and step.captured and step.graph_pool_bytes == 2 * (32 << 20)
    W = net.layers[0].params[0]
    W *= 1.0  # in place: no re-capture
    step(x, labels)
    assert fake_cupy.calls[-1] == "launch" and len(step._graphs) == 2
    step.rebind()  # drops the graphs (waiting for the device first)
    assert len(step._graphs) == 0 and "synchronize" in fake_cupy.calls


def test_a_failed_capture_falls_back_under_auto_and_raises_under_true(monkeypatch, rng):
    cp = FakeCupy(fail_at={"end_capture"})
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    net = _net()
    x, t = rng.standard_normal((5, 5)), rng.random((5, 3))
    ref_loss, ref = net.loss_and_grads(x, t)
    step = net.compile(5)
    step._graphs = GraphCache()
    for _ in range(2):  # the failing call returns the eager results; later calls run without a graph
        loss, g = step(x, t)
        assert loss == ref_loss and np.array_equal(g.flat, ref.flat)
    assert not step.captured and "end_capture failed" in step.capture_error and "buffers" in repr(step)
    strict = net.compile(5, capture=False)
    strict._capture, strict._graphs = True, GraphCache()
    with pytest.raises(CaptureError, match="end_capture failed"):
        strict(x, t)


# ---------------------------------------------------------------------- the plain passes' memory
def test_forward_and_backward_reuse_pooled_blocks_and_never_overwrite_kept_results(rng):
    from jacgrad.cuda import hostpool

    hostpool.release()
    net = _net()
    x1, x2, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), rng.random((4, 3))
    _, g1 = net.loss_and_grads(x1, t)
    y1, cache1 = net.forward(x1)
    snap = [a.copy() for a in (g1.flat, g1.input, *g1.deltas, y1)]
    addresses = set()
    for _ in range(12):  # more calls than the pool remembers blocks
        _, g = net.loss_and_grads(x2, t)
        addresses.add(g.flat.ctypes.data)
        del g
    for a, b in zip((g1.flat, g1.input, *g1.deltas, y1), snap):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(net.backward(cache1, np.ones((4, 3))).flat,
                                  net.backward(net.forward(x1)[1], np.ones((4, 3))).flat)  # the cache is intact
    assert len(addresses) <= 2  # a training loop gets the same gradient block back
    y, cache = net.forward(x1)
    assert not any(np.shares_memory(y, s) for st in cache.states for s in _leaves(st))  # y is the caller's own
    pooled = [id(b) for b in hostpool._blocks]
    g = net.backward(cache, np.ones((4, 3)))
    pooled_after = [id(b) for b in hostpool._blocks]
    assert id(cache.states[2][0].base) in pooled and id(cache.states[0][1].base) in pooled  # x̂ and h: pooled blocks
    assert id(g.deltas[3].base) in pooled_after and id(g.input.base) in pooled_after  # δ and ∂L/∂x too


def _leaves(state):
    if isinstance(state, (list, tuple)):
        return [a for s in state for a in _leaves(s)]
    return [state] if isinstance(state, np.ndarray) else []
