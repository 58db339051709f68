"""``net.compile(B, product=...)``: every parameter-space product compiled (grad_norms, grads, ntk,
ggn_vp, ggn_diagonal). References: the eager products on the same network (the same code on the
same buffers: bitwise on NumPy), torch.func on the torch model the network was read from
(``vmap(jacrev)``: independent, float64 to 1e-10), and the capture path on the fake CuPys
(``fake_cupy_transfers``: no host transfer and no CuPy matmul while recording dense nets;
``fake_cupy_calls``: the graph recorded once and replayed, the fallback of ``capture="auto"``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_calls import FakeCupy
from jacgrad.cuda import gemm as _gemm, graphs as _cuda_graph
from jacgrad.cuda.graphs import CaptureError
from jacgrad.steps.compiled_products import ProductStep

torch = pytest.importorskip("torch", reason="the compiled products are checked against torch.func")
nn = torch.nn

PRODUCTS = ("grad_norms", "grads", "ntk", "ggn_vp", "ggn_diagonal")
B = 4


# ---------------------------------------------------------------------- the models
def _torch_mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 3))


def _torch_blocks():
    from jacgrad.io.interop.torch_blocks import Residual

    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(),
                         Residual(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.GELU()), 0.5),
                         nn.LayerNorm(6), nn.Linear(6, 3))


def _torch_cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                         nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3))


MODELS = {"mlp": (_torch_mlp, (5,)), "blocks": (_torch_blocks, (5,)), "cnn": (_torch_cnn, (2, 4, 4))}


def _model(kind, seed=0):
    make, in_shape = MODELS[kind]
    torch.manual_seed(seed)
    m = make().double()
    with torch.no_grad():  # biases and norm affines away from their defaults
        for name, p in m.named_parameters():
            if "bias" in name or p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    net = (jg.MLP.from_torch(m) if kind == "mlp" else
           jg.Sequential.from_torch(m, in_shape=in_shape if len(in_shape) > 1 else None))
    return m, net, in_shape


def _data(net, in_shape, seed=1, n=B):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + in_shape), rng.standard_normal((n, 3)), rng.standard_normal(net.n_params))


def _eager(net, product, x, t, v, x2=None):
    if product == "grad_norms":
        return jg.per_sample_grad_norms(net, x, t)
    if product == "grads":
        return jg.per_sample_grads(net, x, t).flat
    if product == "ntk":
        return jg.ntk(net, x, x2)
    if product == "ggn_vp":
        return jg.ggn_vp(net, x, v)
    return jg.ggn_diagonal(net, x).flat


def _compiled(step, product, x, t, v, x2=None, copy=False):
    if product in ("grad_norms", "grads"):
        r = step(x, t, copy=copy)
    elif product == "ggn_vp":
        r = step(x, v, copy=copy)
    else:
        r = step(x, copy=copy) if x2 is None else step(x, x2, copy=copy)
    return r.flat if product in ("grads", "ggn_diagonal") else r


# ---------------------------------------------------------------------- NumPy: the eager numbers, bitwise
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("product", PRODUCTS)
def test_bitwise_the_eager_product(kind, product):
    _, net, in_shape = _model(kind)
    step = net.compile(B, product=product)
    for seed in (1, 2):  # twice: the second call reuses every buffer
        x, t, v = _data(net, in_shape, seed)
        got = _compiled(step, product, x, t, v)
        np.testing.assert_array_equal(got, _eager(net, product, x, t, v))
    assert step.product == product and not step.captured and step.capture_error is None


@pytest.mark.parametrize("product", PRODUCTS)
def test_float32_and_fortran_ordered_inputs_are_bitwise_too(product):
    m, _, in_shape = _model("blocks")
    net = jg.Sequential.from_torch(m.float())
    assert net.dtype == np.float32
    x, t, v = (np.asfortranarray(a.astype(np.float32)) if a.ndim > 1 else a.astype(np.float32)
               for a in _data(net, in_shape))
    step = net.compile(B, product=product)
    np.testing.assert_array_equal(_compiled(step, product, x, t, v), _eager(net, product, x, t, v))


def test_two_sided_ntk_and_trace_and_per_layer_norms():
    _, net, in_shape = _model("blocks")
    x, t, _ = _data(net, in_shape)
    x2 = _data(net, in_shape, seed=5, n=3)[0]
    K = net.compile((B, 3), product="ntk")
    np.testing.assert_array_equal(K(x, x2), jg.ntk(net, x, x2))
    Kt = net.compile((B, 3), product="ntk", trace=True, max_memory=None)
    np.testing.assert_array_equal(Kt(x, x2), jg.ntk(net, x, x2, trace=True, max_memory=None))
    n = net.compile(B, product="per_sample_grad_norms", per_layer=True, method="instantiate")
    np.testing.assert_array_equal(n(x, t), net.per_sample_grad_norms(x, t, per_layer=True, method="instantiate"))
    assert n(x, t).shape == (B, len(net.layers))


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_bce"])
@pytest.mark.parametrize("product", PRODUCTS)
def test_other_losses_and_integer_labels(loss, product):
    _, net, in_shape = _model("mlp")
    x, t, v = _data(net, in_shape)
    if loss == "softmax_cross_entropy":
        t = np.array([0, 2, 1, 2])
    else:
        t = (t > 0).astype(float)
    if product == "ntk":  # the kernel has no loss: a loss given is refused, never dropped silently
        with pytest.raises(TypeError, match=r"product='ntk' takes trace, max_memory, not loss"):
            net.compile(B, product=product, loss=loss)
        return
    step = net.compile(B, product=product, loss=loss)
    got = _compiled(step, product, x, t, v)
    if product in ("grad_norms", "grads"):
        want = (net.per_sample_grad_norms(x, t, loss=loss) if product == "grad_norms"
                else net.per_sample_grads(x, t, loss=loss).flat)
    elif product == "ntk":
        want = jg.ntk(net, x)
    elif product == "ggn_vp":
        want = net.ggn_vp(x, v, loss=loss)
    else:
        want = net.ggn_diagonal(x, loss=loss).flat
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------- a token model
V, d, T = 11, 8, 5


def _transformer():
    from jacgrad.io.interop.torch_blocks import Residual

    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(V, d),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True))),
                      Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))),
                      nn.Linear(d, 3)).double()
    return jg.Sequential.from_torch(m, copy=True)


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_token_model_bitwise_the_eager_product(product):
    net = _transformer()
    rng = np.random.default_rng(3)
    tok, t, v = rng.integers(0, V, (3, T)), rng.standard_normal((3, T, 3)), rng.standard_normal(net.n_params)
    step = net.compile(3, product=product, tokens=T)
    np.testing.assert_array_equal(_compiled(step, product, tok, t, v), _eager(net, product, tok, t, v))
    with pytest.raises(ValueError, match="token ids|integer"):
        _compiled(step, product, rng.integers(0, V, (3, T + 1)), t, v)


# ---------------------------------------------------------------------- torch.func: independent
def _torch_reference(m, x, t):
    """From torch.func's per-sample Jacobians ``J_i = ∂y_i/∂θ: (O, P)`` (θ in jacgrad's flat order:
    Linear weights transposed) and mse ``ℓ_i = mean_o (y_io − t_io)²`` (``H_i = 2/O · I``): every product."""
    params = {k: p.detach() for k, p in m.named_parameters()}
    buffers = {k: b.detach() for k, b in m.named_buffers()}

    def f(p, xi):
        return torch.func.functional_call(m, (p, buffers), (xi[None],))[0]

    X = torch.from_numpy(x)
    y = torch.func.vmap(f, in_dims=(None, 0))(params, X).numpy()
    Jd = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
    parts = []
    for name, _ in m.named_parameters():
        g = Jd[name]
        mod = m.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(mod, nn.Linear) and name.endswith("weight"):
            g = g.transpose(-1, -2)
        parts.append(g.reshape(g.shape[0], g.shape[1], -1))
    J = torch.cat(parts, dim=-1).numpy()  # (B, O, P)
    O = J.shape[1]
    grads = np.einsum("bop,bo->bp", J, 2.0 / O * (y - t))
    G = np.einsum("bop,boq->pq", J, J) * (2.0 / O) / len(x)
    return {"grad_norms": np.linalg.norm(grads, axis=1), "grads": grads,
            "ntk": np.einsum("iop,jqp->ijoq", J, J), "ggn": G}


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_product_matches_torch_func(kind):
    m, net, in_shape = _model(kind)
    x, t, v = _data(net, in_shape)
    ref = _torch_reference(m, x, t)
    ref["ggn_vp"], ref["ggn_diagonal"] = ref["ggn"] @ v, np.diag(ref["ggn"])
    for product in PRODUCTS:
        got = _compiled(net.compile(B, product=product), product, x, t, v)
        want = ref[product]
        assert np.abs(got - want).max() <= 1e-10 * max(1.0, np.abs(want).max()), product


# ---------------------------------------------------------------------- the contract
def test_the_result_is_the_buffer_copy_is_fresh_and_parameters_are_read_by_reference():
    _, net, in_shape = _model("mlp")
    x, t, _ = _data(net, in_shape)
    step = net.compile(B, product="grad_norms")
    a = step(x, t)
    assert step(x, t) is a and step(x, t, copy=True) is not a
    kept = step(x, t, copy=True)
    net.weights[0] *= 0.5  # in place: seen by the next call
    np.testing.assert_array_equal(step(x, t), jg.per_sample_grad_norms(net, x, t))
    assert not np.array_equal(step(x, t), kept)
    g = net.compile(B, product="grads")(x, t)
    assert g.weights[0].shape == (B, 5, 7) and np.shares_memory(g.weights[0], g.flat)


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_replaced_parameter_raises_until_rebind(product):
    _, net, in_shape = _model("blocks")
    x, t, v = _data(net, in_shape)
    step = net.compile(B, product=product)
    _compiled(step, product, x, t, v)
    ln = net.layers[2]
    ln._gamma = ln.gamma * 2.0  # what a framework swapping arrays would do (no public setter)
    with pytest.raises(RuntimeError, match=r"layer 2 \(LayerNorm\) gamma is no longer what this compiled product"):
        _compiled(step, product, x, t, v)
    step.rebind()
    np.testing.assert_array_equal(_compiled(step, product, x, t, v), _eager(net, product, x, t, v))
    ln._gamma = np.ones(7)
    with pytest.raises(ValueError, match=r"gamma is now \(7,\) float64; this step was compiled for \(6,\)"):
        step.rebind()


def test_bad_arguments_are_named():
    _, net, in_shape = _model("mlp")
    x, t, v = _data(net, in_shape)
    with pytest.raises(ValueError, match="product 'hessian' has no compiled form; valid names: step, grad_norms"):
        net.compile(B, product="hessian")
    with pytest.raises(TypeError, match="clip: arguments of the .private. training step, not of product='ntk'"):
        net.compile(B, product="ntk", clip=1.0)
    with pytest.raises(TypeError, match="product='grads' takes no options, not trace"):
        net.compile(B, product="grads", trace=True)
    with pytest.raises(TypeError, match="per_layer: options of a compiled product"):
        net.compile(B, per_layer=True)
    with pytest.raises(ValueError, match="the NTK's batch is N or"):
        net.compile((1, 2, 3), product="ntk")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        net.compile(0, product="ggn_vp")
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid names: mse"):
        net.compile(B, product="grad_norms", loss="hinge")


def test_bad_inputs_are_named_and_change_nothing():
    _, net, in_shape = _model("mlp")
    x, t, v = _data(net, in_shape)
    step = net.compile(B, product="grad_norms")
    before = step(x, t, copy=True)
    with pytest.raises(ValueError, match=r"compiled for a batch of \(4, 5\): x must be \(4, 5\), got \(3, 5\)"):
        step(x[:3], t)
    with pytest.raises(ValueError, match=r"target must be \(4, 3\), got \(4, 2\)"):
        step(x, t[:, :2])
    with pytest.raises(TypeError, match="complex"):
        step(x.astype(complex), t)
    with pytest.raises(TypeError, match=r"called as step\(x, target\): got 1 inputs"):
        step(x)
    np.testing.assert_array_equal(step._out, before)
    vp = net.compile(B, product="ggn_vp")
    with pytest.raises(ValueError, match=f"P={net.n_params} parameters"):
        vp(x, v[:-1])
    with pytest.raises(TypeError, match=r"called as step\(x1, x2\)"):
        net.compile((B, 2), product="ntk")(x)
    f32 = jg.MLP.from_torch(_torch_mlp().float())
    with pytest.raises(TypeError, match="x is float64 but the network is float32"):
        f32.compile(B, product="ggn_diagonal")(x)


def test_eight_threads_each_get_their_own_inputs_results():
    _, net, in_shape = _model("blocks")
    steps = {p: net.compile(B, product=p) for p in ("grad_norms", "ntk")}
    inputs = [_data(net, in_shape, seed=100 + i) for i in range(8)]
    want = {p: [_eager(net, p, x, t, v) for x, t, v in inputs] for p in steps}
    errors = []

    def work(i):
        try:
            x, t, v = inputs[i]
            for _ in range(3):
                for p, step in steps.items():
                    got = _compiled(step, p, x, t, v, copy=True)
                    if not np.array_equal(got, want[p][i]):
                        errors.append((i, p))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


# ---------------------------------------------------------------------- the capture path on the fake CuPys
def _inputs(product, net, seed=7):
    rng = np.random.default_rng(seed)
    x, t, v = rng.standard_normal((B, net.n_in)), rng.standard_normal((B, net.n_out)), rng.standard_normal(net.n_params)
    return x, t, v, ((t,) if product in ("grad_norms", "grads") else (v,) if product == "ggn_vp" else ())


@pytest.mark.parametrize("make", ["mlp", "seq"])
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_dense_nets_record_through_direct_cublas_with_no_host_transfer(recording, make, product, loss):
    """What a capture runs (``step._run`` inside ``direct_cublas()``) on fake device arrays: no
    device-to-host read (a graph cannot hold one), no CuPy matmul (CuPy refuses them under
    capture), and the cuBLAS calls jacgrad makes instead give the eager NumPy numbers."""
    from test_compiled_jacobian import _mlp, _seq

    build = {"mlp": _mlp, "seq": _seq}[make]
    host, net = build(), build(to=recording.asarray)
    x, t, v, rest = _inputs(product, host)
    step = ProductStep(net, B, product, capture=False, **({} if product == "ntk" else {"loss": loss}))
    step(recording.asarray(np.zeros_like(x)), *(recording.asarray(a) for a in rest))  # warm-up, outside the block
    step._x[...] = recording.asarray(x)
    recording.reset()
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run(False)
    assert recording.transfers == 0, dict(recording.where)
    assert recording.host.calls  # the products went through jacgrad's cuBLAS calls
    kw = {} if product == "ntk" else {"loss": loss}
    want = {"grad_norms": lambda: host.per_sample_grad_norms(x, t, **kw),
            "grads": lambda: host.per_sample_grads(x, t, **kw).flat, "ntk": lambda: jg.ntk(host, x),
            "ggn_vp": lambda: host.ggn_vp(x, v, **kw), "ggn_diagonal": lambda: host.ggn_diagonal(x, **kw).flat}[product]()
    got = np.asarray(step._out.view(np.ndarray))
    assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want)


@pytest.fixture
def graphs(recording, monkeypatch):
    """The CUDA-graph calls (``fake_cupy_calls``) beside the fake arrays: what ``GraphCache`` records."""
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    return cp


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_dense_net_is_recorded_once_replayed_and_dropped_by_rebind(recording, graphs, product):
    from test_compiled_jacobian import _seq

    host, net = _seq(), _seq(to=recording.asarray)
    x, t, v, rest = _inputs(product, host)
    step = net.compile(B, product=product)
    assert step._graphs is not None  # on the (fake) GPU with capture="auto"
    r = step(recording.asarray(x), *(recording.asarray(a) for a in rest))  # eager, then recorded
    want = _eager(host, product, x, t, v)
    np.testing.assert_allclose(np.asarray((r.flat if product in ("grads", "ggn_diagonal") else r).view(np.ndarray)), want,
                               rtol=1e-12, atol=1e-14)
    assert graphs.calls == ["stream enter", f"alloc {32 << 20}", "begin_capture", "end_capture", "upload",
                            "stream exit"], (graphs.calls, step.capture_error)
    step(recording.asarray(x), *(recording.asarray(a) for a in rest))
    assert graphs.calls[-1] == "launch" and step.captured and step.capture_error is None
    net.layers[0]._W = net.layers[0].W + 0.0
    step.rebind()  # drops the graph, waiting for the device first
    assert len(step._graphs) == 0 and "synchronize" in graphs.calls


def test_what_cannot_be_recorded_falls_back_under_auto_naming_it(recording, graphs, monkeypatch):
    """A piece that multiplies with CuPy's own matmul (here the token leaves', made to bypass ``_gemm``;
    every layer of jacgrad goes through ``_gemm``: ``test_compiled_capture_layers.py``): under capture
    that raises, so ``"auto"`` returns the eager results and runs without a graph from then on,
    ``capture_error`` naming the function; ``capture=True`` raises."""
    import jacgrad.protocol.leaves as leaves

    monkeypatch.setattr(leaves, "matmul", lambda a, b: a @ b)  # CuPy's matmul: refused while recording
    L = jg.layers
    rng = np.random.default_rng(8)

    def make(to):
        r = np.random.default_rng(9)
        return jg.Sequential([L.Dense(to(r.standard_normal((5, 6)) / 3), to(r.standard_normal(6)), "tanh"),
                              L.LayerNorm(to(1 + 0.2 * r.standard_normal(6)), to(r.standard_normal(6))),
                              L.Dense(to(r.standard_normal((6, 3)) / 3), to(r.standard_normal(3)))])

    host, net = make(lambda a: a), make(recording.asarray)
    step = net.compile(B, product="grad_norms", tokens=3)
    for _ in range(2):
        x, t = rng.standard_normal((B, 3, 5)), rng.standard_normal((B, 3, 3))
        got = step(recording.asarray(x), recording.asarray(t))
        np.testing.assert_allclose(np.asarray(got.view(np.ndarray)), host.per_sample_grad_norms(x, t), rtol=1e-12)
    assert not step.captured
    assert "NotImplementedError" in step.capture_error and "in jacgrad.protocol.leaves." in step.capture_error
    strict = net.compile(B, product="grad_norms", tokens=3, capture=True)
    with pytest.raises(CaptureError, match=r"in jacgrad\.protocol\.leaves\.\w+\.sq_norms"):
        strict(recording.asarray(x), recording.asarray(t))


@pytest.mark.parametrize("product", ["grad_norms", "grads"])
def test_integer_labels_are_checked_at_load_and_not_read_back_while_recording(recording, product):
    """The eager loss range-checks integer labels on the host (one device-to-host read); a compiled
    product checks them when it loads them, before its graph, and runs the loss without the read."""
    from test_compiled_jacobian import _mlp

    host, net = _mlp(), _mlp(to=recording.asarray)
    x, labels = np.random.default_rng(12).standard_normal((B, 5)), np.array([0, 3, 1, 2])
    step = ProductStep(net, B, product, loss="softmax_cross_entropy", capture=False)
    with pytest.raises(ValueError, match=r"label 4 is out of range for C=4 classes"):
        step(recording.asarray(x), recording.asarray(np.array([0, 4, 1, 2])))
    step(recording.asarray(x), recording.asarray(labels))
    recording.reset()
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run(True)
    assert recording.transfers == 0, dict(recording.where)
    want = (host.per_sample_grad_norms(x, labels, loss="softmax_cross_entropy") if product == "grad_norms"
            else host.per_sample_grads(x, labels, loss="softmax_cross_entropy").flat)
    np.testing.assert_allclose(np.asarray(step._out.view(np.ndarray)), want, rtol=1e-12, atol=1e-15)


def test_an_option_a_product_does_not_read_is_refused_not_dropped():
    _, net, _ = _model("mlp")
    for product, kw, bad in [("ntk", {"method": "gram"}, "method"), ("grads", {"per_layer": True}, "per_layer"),
                             ("ggn_vp", {"trace": True}, "trace"), ("grad_norms", {"max_memory": 1 << 20}, "max_memory"),
                             ("ggn_diagonal", {"per_layer": True, "method": "gram"}, "method, per_layer")]:
        with pytest.raises(TypeError, match=rf"product='{product}' takes .*, not {bad}$"):
            net.compile(B, product=product, **kw)
        with pytest.raises(TypeError, match=rf"product='{product}' takes .*, not "):  # built directly too
            ProductStep(net, B, product, **kw)
    assert net.compile(B, product="ntk", trace=True, max_memory=None).trace  # what it does read


def test_the_eager_products_out_argument_is_checked_and_written():
    _, net, in_shape = _model("blocks")
    x, t, v = _data(net, in_shape)
    out = np.empty(B)
    assert jg.per_sample_grad_norms(net, x, t, out=out) is out
    np.testing.assert_array_equal(out, jg.per_sample_grad_norms(net, x, t))
    with pytest.raises(ValueError, match=r"per_sample_grad_norms: out is \(3,\) float64; the result is \(4,\) float64"):
        jg.per_sample_grad_norms(net, x, t, out=np.empty(3))
    with pytest.raises(ValueError, match=r"ggn_vp: out is \(\d+,\) float32; the result is \(\d+,\) float64"):
        jg.ggn_vp(net, x, v, out=np.empty(net.n_params, np.float32))
    with pytest.raises(ValueError, match="ntk: out must be C-contiguous"):
        jg.ntk(net, x, trace=True, out=np.empty((B, 2 * B))[:, ::2])
    with pytest.raises(TypeError, match="ggn_diagonal: out must be a numpy array"):
        jg.ggn_diagonal(net, x, out=list(range(net.n_params)))
    g = jg.per_sample_grads(net, x, t, out=np.empty((B, net.n_params)))
    np.testing.assert_array_equal(g.flat, jg.per_sample_grads(net, x, t).flat)
