"""Every compiled step of every layer kind records into a CUDA graph: convolutions (grouped, strided,
BatchNorm, pools, PReLU, a ResNet block with a projection shortcut), token layers (LayerNorm/RMSNorm
per token, MLP-Mixer's transposes, a token read-out), attention (causal), a GPT (embedding,
positions, pre-norm blocks) and a ViT (patch conv, class token, positions, attention, read-out).

What a capture runs (``step._run`` inside ``direct_cublas()``, the block ``GraphCache`` records in)
is run on the fake CuPy (``fake_cupy_transfers``) with CuPy's own ``matmul``/``einsum`` REFUSED as
CuPy refuses cuBLAS under stream capture, and jacgrad's cuBLAS calls carried out by the BLAS
definition on the host (``fake_capture``, the ``recording`` fixture). Checked: no device-to-host read (a graph cannot hold one),
jacgrad's cuBLAS calls made, and the numbers equal to the eager products of the same network on
NumPy (an independent path: NumPy's matmul, ``unique`` for the embedding, no ``direct_cublas``).
Then one token net and one conv net are recorded through ``GraphCache`` (``fake_cupy_calls``) and
replayed."""

from __future__ import annotations


import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_calls import FakeCupy
from jacgrad.cuda import gemm as _gemm, graphs as _cuda_graph
from jacgrad.steps.compiled_products import ProductStep

L = jg.layers
B = 4
PRODUCTS = ("grad_norms", "grads", "ntk", "ggn_vp", "ggn_diagonal", "step", "private")


# ---------------------------------------------------------------------- the networks
def _ln(r, to, n):
    return L.LayerNorm(to(1 + 0.2 * r.standard_normal(n)), to(r.standard_normal(n) / 3))


def _attention(r, to, d, causal):
    w = lambda *s: to(r.standard_normal(s) / 3)  # noqa: E731
    return L.MultiHeadAttention(w(d, d), w(d, d), w(d, d), w(d, d), 2, w(d), w(d), w(d), w(d), causal=causal)


def _net(kind, to=lambda a: a):
    """``(net, per-sample input shape or None for token ids, per-sample target shape, compile kwargs)``."""
    r = np.random.default_rng(9)
    w = lambda *s: to(r.standard_normal(s) / 3)  # noqa: E731
    if kind == "tokens":
        return jg.Sequential([L.Dense(w(5, 6), w(6), "tanh"), _ln(r, to, 6), L.Dense(w(6, 3), w(3))]), (3, 5), (3, 3), 3
    if kind == "attention":
        return (jg.Sequential([L.Dense(w(5, 8), w(8), "tanh"), _attention(r, to, 8, True), _ln(r, to, 8),
                               L.Dense(w(8, 3), w(3))]), (3, 5), (3, 3), 3)
    if kind == "gpt":
        return (jg.Sequential([L.Embedding(w(7, 8)), L.PositionalEmbedding(w(3, 8)),
                               L.Residual([_ln(r, to, 8), _attention(r, to, 8, True)]),
                               L.Residual([L.RMSNorm(to(1 + 0.2 * r.standard_normal(8))), L.Dense(w(8, 8), w(8), "gelu"),
                                           L.Dense(w(8, 8), w(8))]),
                               L.Dense(w(8, 7), w(7))]), None, (3, 7), 3)
    if kind == "vit":
        return (jg.Sequential([L.Conv2d(w(8, 2, 2, 2), w(8), stride=2), L.ImageToTokens(), L.ClassToken(w(8)),
                               L.PositionalEmbedding(w(5, 8)), L.Residual([_ln(r, to, 8), _attention(r, to, 8, False)]),
                               L.SelectToken(0), L.Dense(w(8, 3), w(3))], in_shape=(2, 4, 4)), (2, 4, 4), (3,), None)
    if kind == "mixer":
        return (jg.Sequential([L.Dense(w(5, 4), w(4)),
                               L.Residual([L.RMSNorm(to(1 + 0.2 * r.standard_normal(4))), L.TransposeTokens(3, 4),
                                           L.Dense(w(3, 3), w(3), "gelu"), L.TransposeTokens(4, 3)]),
                               L.TokenMean(), L.Dense(w(4, 3), w(3))]), (3, 5), (3,), 3)
    if kind == "cnn":
        return (jg.Sequential([L.Conv2d(w(4, 3, 3, 3), w(4), padding="same", activation="relu"),
                               L.BatchNorm2d(w(4), w(4), w(4), to(np.full(4, 1.5)), activation="tanh"),
                               L.MaxPool2d(2), L.Conv2d(w(6, 2, 2, 2), None, groups=2, activation="gelu"), L.AvgPool2d(2, 1),
                               L.AdaptiveAvgPool2d(1), L.Flatten(), L.PReLU(to(np.full(6, 0.2))), L.Dense(w(6, 3), w(3))],
                              in_shape=(3, 6, 6)), (3, 6, 6), (3,), None)
    assert kind == "resnet"
    return (jg.Sequential([L.Conv2d(w(4, 2, 3, 3), w(4), padding=1, activation="relu"),
                           L.Residual([L.Conv2d(w(6, 4, 3, 3), w(6), padding=1, stride=2, activation="relu"),
                                       L.Conv2d(w(6, 6, 3, 3), w(6), padding=1)],
                                      shortcut=[L.Conv2d(w(6, 4, 1, 1), None, stride=2)]),
                           L.Activation("relu"), L.AdaptiveAvgPool2d(1), L.Flatten(), L.Dense(w(6, 3), w(3))],
                          in_shape=(2, 4, 4)), (2, 4, 4), (3,), None)


KINDS = ("tokens", "attention", "gpt", "vit", "mixer", "cnn", "resnet")
CASES = [(k, p, "mse") for k in KINDS for p in PRODUCTS] + [
    (k, p, "softmax_cross_entropy") for k in ("vit", "mixer", "cnn") for p in ("grad_norms", "ggn_vp", "step", "private")] + [
    ("gpt", p, "sigmoid_bce") for p in ("grads", "ggn_diagonal", "step")]


def _data(net, in_shape, out_shape, loss, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 7, (B, 3)) if in_shape is None else rng.standard_normal((B,) + in_shape)
    t = rng.standard_normal((B,) + out_shape)
    if loss == "sigmoid_bce":
        t = (t > 0).astype(float)
    elif loss == "softmax_cross_entropy":
        t = rng.integers(0, out_shape[-1], B)
    return x, t, rng.standard_normal(net.n_params)


def _eager(net, product, x, t, v, loss):
    """The eager products of the NumPy network: ``{name: array}``."""
    if product == "step":
        value, g = net.loss_and_grads(x, t, loss=loss)
        return {"loss": value, "grads": g.flat}
    if product == "private":
        r = net.clipped_grad(x, t, loss=loss, max_norm=0.5)
        return {"grads": r.grads.flat, "norms": r.norms}
    kw = {} if product == "ntk" else {"loss": loss}
    return {"out": {"grad_norms": lambda: net.per_sample_grad_norms(x, t, **kw),
                    "grads": lambda: net.per_sample_grads(x, t, **kw).flat, "ntk": lambda: jg.ntk(net, x),
                    "ggn_vp": lambda: net.ggn_vp(x, v, **kw), "ggn_diagonal": lambda: net.ggn_diagonal(x, **kw).flat}[product]()}


def _compiled(net, product, loss, T):
    kw = {} if T is None else {"tokens": T}
    if product in ("step", "private"):
        return net.compile(B, loss=loss, capture=False, **kw, **({"clip": 0.5} if product == "private" else {}))
    return ProductStep(net, B, product, loss=loss, capture=False, **kw)


def _results(step, product):
    """The step's results after ``_run``, as the eager dict (``_results``: what a call returns)."""
    r = step._results(True)
    host = lambda a: np.asarray(a.view(np.ndarray))  # noqa: E731
    if product == "step":
        return {"loss": host(r[0]), "grads": host(r[1].flat)}
    if product == "private":
        return {"grads": host(r[1].grads.flat), "norms": host(r[1].norms)}
    return {"out": host(r.flat if product in ("grads", "ggn_diagonal") else r)}


@pytest.mark.parametrize("kind,product,loss", CASES)
def test_what_a_capture_runs_needs_no_host_read_and_no_cupy_matmul(recording, kind, product, loss):
    host, in_shape, out_shape, T = _net(kind)
    net = _net(kind, recording.asarray)[0]
    x, t, v = _data(host, in_shape, out_shape, loss)
    step = _compiled(net, product, loss, T)
    rest = (v,) if product == "ggn_vp" else () if product in ("ntk", "ggn_diagonal") else (t,)
    dev = lambda a: recording.asarray(a)  # noqa: E731
    step(dev(x), *(dev(a) for a in rest))  # the warm-up call (eager, outside the block): loads the inputs
    recording.reset()
    calls = len(recording.host.calls)
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run(loss == "softmax_cross_entropy" and product not in ("ntk", "ggn_vp", "ggn_diagonal"))
    assert recording.transfers == 0, dict(recording.where)
    assert len(recording.host.calls) > calls  # the products went through jacgrad's cuBLAS calls
    want, got = _eager(host, product, x, t, v, loss), _results(step, product)
    for name, w in want.items():
        w = np.asarray(w)
        assert np.linalg.norm(got[name] - w) <= 1e-12 * np.linalg.norm(w) + 1e-15, (name, got[name], w)


# ---------------------------------------------------------------------- recorded once, replayed
@pytest.fixture
def graphs(recording, monkeypatch):
    """The CUDA-graph calls (``fake_cupy_calls``) beside the fake arrays: what ``GraphCache`` records."""
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    return cp


@pytest.mark.parametrize("kind,product", [("gpt", "grad_norms"), ("attention", "ntk"), ("cnn", "ggn_vp"),
                                          ("resnet", "step"), ("vit", "private")])
def test_token_and_conv_steps_are_recorded_once_and_replayed(recording, graphs, kind, product):
    host, in_shape, out_shape, T = _net(kind)
    net = _net(kind, recording.asarray)[0]
    kw = {} if T is None else {"tokens": T}
    if product in ("step", "private"):
        step = net.compile(B, **kw, **({"clip": 0.5} if product == "private" else {}))
    else:
        step = net.compile(B, product=product, **kw)
    assert step._graphs is not None  # on the (fake) GPU with capture="auto"
    for seed in (1, 2):  # the first call runs eagerly and records; the second replays
        x, t, v = _data(host, in_shape, out_shape, "mse", seed)
        rest = (v,) if product == "ggn_vp" else () if product == "ntk" else (t,)
        step(recording.asarray(x), *(recording.asarray(a) for a in rest))
    assert step.captured and step.capture_error is None, step.capture_error
    assert graphs.calls.count("begin_capture") == 1 and graphs.calls[-1] == "launch", graphs.calls


# ---------------------------------------------------------------------- NumPy: what the capture path needed
def test_copy_true_copies_an_attention_layers_tuple_of_deltas():
    """An attention layer's δ is a tuple (its q, k, v, output projections' cotangents): ``copy=True``
    copies each, and the next call does not change the copies."""
    net, in_shape, out_shape, T = _net("attention")
    step = net.compile(B, tokens=T)
    x, t, _ = _data(net, in_shape, out_shape, "mse")
    _, g = step(x, t, copy=True)
    _, eager = net.loss_and_grads(x, t)
    np.testing.assert_allclose(g.flat, eager.flat, rtol=1e-13)
    first = [np.array(d) for d in g.deltas[1]]
    assert isinstance(g.deltas[1], tuple) and len(first) == 4
    step(x + 1.0, t)
    for a, b in zip(g.deltas[1], first):
        np.testing.assert_array_equal(a, b)


def test_a_token_readout_lets_a_token_step_take_softmax_cross_entropy():
    """``tokens=T`` with a read-out (``TokenMean``) gives ``(B, C)`` logits: softmax cross-entropy is
    taken, as eager ``loss_and_grads`` takes it; a net whose output keeps the token axis refuses it."""
    net, in_shape, _, T = _net("mixer")
    x, labels = np.random.default_rng(3).standard_normal((B,) + in_shape), np.array([0, 2, 1, 2])
    value, g = net.compile(B, tokens=T, loss="softmax_cross_entropy")(x, labels)
    want_value, want = net.loss_and_grads(x, labels, loss="softmax_cross_entropy")
    np.testing.assert_allclose(g.flat, want.flat, rtol=1e-13)
    np.testing.assert_allclose(value, want_value, rtol=1e-14)
    norms = net.compile(B, product="grad_norms", tokens=T, loss="softmax_cross_entropy")(x, labels)
    np.testing.assert_allclose(norms, net.per_sample_grad_norms(x, labels, loss="softmax_cross_entropy"), rtol=1e-13)
    tokens_out = _net("tokens")[0]
    with pytest.raises(ValueError, match=r"softmax_cross_entropy takes \(B, C\) logits, but a token step's output is \(B, T, C\)"):
        tokens_out.compile(B, tokens=3, loss="softmax_cross_entropy")


def test_a_token_readouts_ntk_has_one_output_block_per_class():
    net, in_shape, _, T = _net("mixer")
    x = np.random.default_rng(4).standard_normal((B,) + in_shape)
    K = net.compile(B, product="ntk", tokens=T)(x)
    assert K.shape == (B, B, 3, 3)
    np.testing.assert_allclose(K, jg.ntk(net, x), rtol=1e-13)


def test_the_embeddings_fixed_shape_norms_are_the_sorted_ones():
    """The device formulation of the embedding's per-sample norms (``_sq_norms_fixed_shape``: shapes
    fixed by (B, T, d), recordable) against the sort on NumPy and the Gram form, padding included."""
    from jacgrad.tokens import embedding_leaf as el

    rng = np.random.default_rng(3)
    E = L.Embedding(rng.standard_normal((5, 4)), padding_idx=2)
    tok = rng.integers(0, 5, (6, 7))
    _, st = E.forward(tok)
    delta = rng.standard_normal((6, 7, 4))
    want = el.embedding_sq_norms(st, delta)
    brute = np.array([sum(np.sum(delta[i][(tok[i] == v) & (tok[i] != 2)].sum(axis=0) ** 2) for v in range(5))
                      for i in range(6)])
    np.testing.assert_allclose(want, brute, rtol=1e-13)
    np.testing.assert_allclose(el._sq_norms_fixed_shape(st, st.masked(delta)), brute, rtol=1e-13)
    np.testing.assert_allclose(el.embedding_sq_norms(st, delta, method="gram"), brute, rtol=1e-13)


def test_an_activation_after_an_image_layer_takes_its_shape():
    """``Activation("relu")`` made without a width after a convolution acts on its images, so a pool can follow."""
    net = jg.Sequential([L.Conv2d(np.ones((4, 3, 3, 3)) / 9, np.zeros(4), padding=1), L.Activation("tanh"),
                         L.MaxPool2d(2), L.Flatten(), L.Dense(np.ones((16, 2)))], in_shape=(3, 4, 4))
    assert net.layers[1].in_shape == (4, 4, 4)
    x = np.random.default_rng(5).standard_normal((2, 3, 4, 4))
    y = net.forward(x)
    y = y[0] if isinstance(y, tuple) else y
    conv = net.layers[0].forward(x)[0]
    pooled = np.tanh(conv).reshape(2, 4, 2, 2, 2, 2).max(axis=(3, 5))
    np.testing.assert_allclose(y, pooled.reshape(2, 16) @ np.ones((16, 2)), rtol=1e-13)


# ---------------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_gpu_graphs_record_every_layer_and_replay_the_float64_numbers(kind, product, dtype, tol):
    """On the device: ``capture=True`` (a failed capture raises), three calls on fresh inputs (the
    first records, the others replay), each against the eager float64 NumPy products."""
    cp = pytest.importorskip("cupy")
    host, in_shape, out_shape, T = _net(kind)
    net = _net(kind, lambda a: cp.asarray(np.asarray(a, dtype=dtype)))[0]
    kw = {} if T is None else {"tokens": T}
    if product in ("step", "private"):
        step = net.compile(B, capture=True, **kw, **({"clip": 0.5} if product == "private" else {}))
    else:
        step = net.compile(B, product=product, capture=True, **kw)
    for seed in (1, 2, 3):
        x, t, v = _data(host, in_shape, out_shape, "mse", seed)
        rest = (v,) if product == "ggn_vp" else () if product in ("ntk", "ggn_diagonal") else (t,)
        cast = lambda a: cp.asarray(a if a.dtype.kind in "iu" else a.astype(dtype))  # noqa: E731
        r = step(cast(x), *(cast(a) for a in rest), copy=True)
        got = ({"loss": r[0], "grads": r[1].flat} if product == "step" else
               {"grads": r[1].grads.flat, "norms": r[1].norms} if product == "private" else
               {"out": r.flat if product in ("grads", "ggn_diagonal") else r})
        for name, w in _eager(host, product, x, t, v, "mse").items():
            g = cp.asnumpy(got[name]).astype(np.float64)
            w = np.asarray(w, dtype=np.float64)
            assert np.linalg.norm(g - w) <= tol * np.linalg.norm(w) + 1e-12, (name, seed)
    assert step.captured, step.capture_error


def _recorded_jacobians(recording, step, host, x):
    """Run ``step`` on ``x`` once eagerly, then what its capture runs: nothing may be read back, and the
    buffer must hold the eager Jacobians of ``host`` (returned, for the caller's shape checks)."""
    step(recording.asarray(x))
    recording.reset()
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run()
    assert recording.transfers == 0, dict(recording.where)
    want = host.jacobian_chain(host.forward(x)[1]).jacobian()
    np.testing.assert_allclose(np.asarray(step._out.view(np.ndarray)), want, rtol=1e-12, atol=1e-14)
    return want


@pytest.mark.parametrize("kind", ["cnn", "resnet", "vit"])
def test_compile_jacobian_of_an_image_net_takes_images_and_records(recording, kind):
    """``net.compile_jacobian(B)`` of an image net takes ``(B, C, H, W)`` (it took ``(B, C·H·W)``, which its
    first layer then refused) and what its capture runs reads nothing back and calls no CuPy matmul;
    ``(B, n_out, C·H·W)``, the eager Jacobians."""
    host, in_shape, out_shape, _ = _net(kind)
    net = _net(kind, recording.asarray)[0]
    x = _data(host, in_shape, out_shape, "mse")[0]
    step = net.compile_jacobian(B, capture=False)
    with pytest.raises(ValueError, match=r"batch 4 × images \(\d+, \d+, \d+\): x must be \(4, \d+, \d+, \d+\)"):
        step(recording.asarray(x.reshape(B, -1)))
    want = _recorded_jacobians(recording, step, host, x)
    assert want.shape == (B, 3, int(np.prod(in_shape)))


@pytest.mark.parametrize("kind", ["tokens", "attention", "mixer"])
def test_compile_jacobian_of_token_batches(recording, kind):
    """``compile_jacobian(B, tokens=T)``: ``x (B, T, n_in)`` -> the eager ``(B, T·n_out, T·n_in)`` Jacobians
    (``(B, n_out, T·n_in)`` after a read-out); its capture reads nothing back and calls no CuPy matmul.
    Integer ids (an Embedding first) have no Jacobian: refused, named."""
    host, in_shape, out_shape, T = _net(kind)
    net = _net(kind, recording.asarray)[0]
    x = _data(host, in_shape, out_shape, "mse")[0]
    step = net.compile_jacobian(B, capture=False, tokens=T)
    want = _recorded_jacobians(recording, step, host, x)
    assert want.shape == (B, int(np.prod(out_shape)), T * in_shape[-1])
    with pytest.raises(ValueError, match=r"batch 4 × T=3 × 5 features: x must be \(4, 3, 5\)"):
        step(recording.asarray(x[:, :2]))
    with pytest.raises(ValueError, match=r"integer token ids \(an Embedding first\), which have no Jacobian"):
        _net("gpt")[0].compile_jacobian(B, tokens=3)
