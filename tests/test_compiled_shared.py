"""``net.compile(B)`` (the compiled training step, and its private form ``clip=C``) on networks with
a shared parameter (``protocol.sharing.Ties``): one array used in several places, or a 2-D array
and its transpose (a tied autoencoder, a GPT's tied unembedding ``Dense(E.T)``).

References: the eager ``net.loss_and_grads`` / ``net.clipped_grad`` (the same passes and the same
``Ties.reduce``: bitwise on NumPy), an update applied by hand once per memory block (found with
``np.shares_memory``, not with ``Ties``), ``jg.per_sample_grad_norms``, and torch: autograd with
``torch.optim.SGD`` / ``Adam`` on the tied torch model (which updates a tied parameter once) and
``torch.func.vmap(grad)`` for the clipped sum. The recorded part runs on the fake CuPy of
``fake_cupy_transfers`` (the ``recording`` fixture of conftest.py): no host transfer, no CuPy
matmul."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import gemm as _gemm

L = jg.layers
B, T = 5, 4


# ---------------------------------------------------------------------- the nets (NumPy; ``to`` moves arrays)
def tied_mlp(dtype="float64", seed=0, to=lambda a: a):
    """One (6, 6) array used by all five layers (``jg.MLP([W] * 5)``: one parameter), biases their own."""
    rng = np.random.default_rng(seed)
    W = to((rng.standard_normal((6, 6)) / np.sqrt(6)).astype(dtype))
    b = [to((0.2 * rng.standard_normal(6)).astype(dtype)) for _ in range(5)]
    return jg.MLP([W] * 5, b, ["tanh", "gelu", "sigmoid", "tanh", "identity"])


def tied_autoencoder(dtype="float64", seed=1, to=lambda a: a):
    """An encoder ``W (6, 4)`` and its tied decoder ``W.T``: one parameter, used as it is and transposed."""
    rng = np.random.default_rng(seed)
    W = to((rng.standard_normal((6, 4)) / 2).astype(dtype))
    return jg.MLP([W, W.T], [to((0.1 * rng.standard_normal(n)).astype(dtype)) for n in (4, 6)], ["tanh", "identity"])


def tied_unembedding(dtype="float64", seed=2, to=lambda a: a):
    """Embedding ``E (10, 4)`` -> LayerNorm -> a Dense used twice -> the tied unembedding ``Dense(E.T, b)``."""
    rng = np.random.default_rng(seed)
    r = lambda *s: to((rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype))  # noqa: E731
    emb = L.Embedding(to(rng.standard_normal((10, 4)).astype(dtype)))
    block = L.Dense(r(4, 4), r(4), "tanh")
    return jg.Sequential([emb, L.LayerNorm(1.0 + r(4), r(4)), block, block, L.Dense(emb.E.T, r(10))])


def tied_tokens(dtype="float64", seed=4, to=lambda a: a):
    """Token batches ``(B, T, 6)`` through ``Dense(A)`` -> RMSNorm -> ``Dense(A.T)``: a transposed tie
    with no Embedding in front."""
    rng = np.random.default_rng(seed)
    A = to((rng.standard_normal((6, 5)) / np.sqrt(6)).astype(dtype))
    g = to((1.0 + 0.3 * rng.standard_normal(5)).astype(dtype))
    return jg.Sequential([L.Dense(A, to((0.1 * rng.standard_normal(5)).astype(dtype)), "gelu"), L.RMSNorm(g),
                          L.Dense(A.T, to((0.1 * rng.standard_normal(6)).astype(dtype)))])


NETS = {"mlp": tied_mlp, "autoencoder": tied_autoencoder, "unembedding": tied_unembedding, "tokens": tied_tokens}


def _data(kind, net, loss="mse", dtype="float64", seed=3):
    rng = np.random.default_rng(seed)
    lead = (B, T) if kind in ("unembedding", "tokens") else (B,)
    x = rng.integers(0, 10, lead) if kind == "unembedding" else rng.standard_normal(lead + (net.n_in,)).astype(dtype)
    t = (rng.integers(0, net.n_out, B) if loss == "softmax_cross_entropy"
         else rng.uniform(0, 1, lead + (net.n_out,)).astype(dtype))
    return x, t


def _compile(kind, net, **kw):
    return net.compile(B, tokens=T if kind in ("unembedding", "tokens") else None, **kw)


def _uses(net, g) -> list:
    """``[(array, its gradient)]`` for every use of a parameter, in layer order (a tied use listed again)."""
    def walk(layers, grads):
        for Lj, gj in zip(layers, grads):
            if hasattr(Lj, "layers"):
                yield from walk(Lj.layers, gj)
            else:
                yield from ((p, gj[n]) for n, p in zip(Lj.names, Lj.params))
    return list(walk(net.layers, g.layers))


def _sgd_once_by_memory(net, g, lr) -> None:
    """The reference update: ``p -= lr·g`` on every use whose memory no earlier use holds."""
    done = []
    for p, dp in _uses(net, g):
        if not any(np.shares_memory(p, q) for q in done):
            p -= lr * dp
            done.append(p)


def _params(step, g) -> np.ndarray:
    return np.concatenate([jg.to_numpy(p).ravel() for p, _ in step.param_pairs(g)])


# ---------------------------------------------------------------------- the step = loss_and_grads, updated once
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind,loss", [("mlp", "mse"), ("mlp", "softmax_cross_entropy"), ("autoencoder", "mse"),
                                       ("unembedding", "mse"), ("unembedding", "sigmoid_bce")])
def test_the_step_is_loss_and_grads_bitwise_and_updates_each_parameter_once(kind, loss, dtype):
    """Per call: the loss and the gradients (each shared parameter the sum over its uses) of eager
    ``loss_and_grads`` at the same parameters, bitwise. Three SGD steps through ``param_pairs`` leave
    the parameters bitwise where the hand update of a twin network leaves them."""
    net = NETS[kind](dtype)
    twin = copy.deepcopy(net)  # pickling keeps the ties (TiedLayers.__setstate__)
    assert net._ties().shared and twin._ties().uses == net._ties().uses
    x, t = _data(kind, net, loss, dtype)
    step = _compile(kind, net, loss=loss)
    for _ in range(3):
        value, g = step(x, t)
        ref_value, ref = net.loss_and_grads(x, t, loss=loss)
        assert value == ref_value and g.flat.shape == (net.n_params,) and np.array_equal(g.flat, ref.flat)
        for (_, a), (_, b) in zip(_uses(net, g), _uses(net, ref)):
            assert np.array_equal(a, b)  # every use's view: a tied use sees the sum (transposed where it is)
        twin_value, twin_g = twin.loss_and_grads(x, t, loss=loss)
        assert twin_value == value and np.array_equal(twin_g.flat, g.flat)
        for p, dp in step.param_pairs(g):
            p -= 0.1 * dp
        _sgd_once_by_memory(twin, twin_g, 0.1)
        assert all(np.array_equal(p, q) for (p, _), (q, _) in zip(_uses(net, g), _uses(twin, twin_g)))


def test_a_shared_gradient_is_one_view_and_the_sum_of_the_uses():
    """``MLP([W] * 5)``: every ``g.weights[j]`` is one view, ``Σ_j z_{j-1}ᵀ δ_j`` over the five uses
    (z from a forward written out here, δ the step's own deltas), and an update through
    ``param_pairs`` moves W once."""
    net = tied_mlp()
    x, t = _data("mlp", net)
    step = net.compile(B)
    _, g = step(x, t)
    assert all(dW is g.weights[0] for dW in g.weights) and len(step.param_pairs(g)) == 6  # W once, 5 biases
    z, total = x, np.zeros((6, 6))
    for j, (W, b, name) in enumerate(zip(net.weights, net.biases, net.activations)):
        total += z.T @ g.deltas[j]
        z = jg.activations.get(name).f(z @ W + b)
    np.testing.assert_allclose(g.weights[0], total, rtol=1e-13, atol=1e-15)
    W, before = net.weights[0], net.weights[0].copy()
    (p, dp), *_ = step.param_pairs(g)
    assert p is W and np.shares_memory(dp, g.flat)
    p -= 0.5 * dp
    assert all(w is W for w in net.weights) and np.array_equal(W, before - 0.5 * g.weights[0])
    with pytest.raises(ValueError, match=r"param_pairs takes this step's gradients \(flat: \(66,\)\)"):
        step.param_pairs(np.zeros(3))


def test_copy_gives_fresh_views_of_the_sums_and_nbytes_counts_the_sums():
    net = tied_autoencoder()
    x, t = _data("autoencoder", net)
    step = net.compile(B)
    kept = step(x, t, copy=True)[1]
    g = step(x, t)[1]
    assert np.array_equal(kept.flat, g.flat) and not np.shares_memory(kept.flat, g.flat)
    assert np.shares_memory(kept.weights[1], kept.flat) and np.array_equal(kept.weights[1], kept.weights[0].T)
    untied = jg.MLP([net.weights[0].copy(), net.weights[0].T.copy()], [b.copy() for b in net.biases],
                    ["tanh", "identity"]).compile(B)
    assert step.nbytes == untied.nbytes + net.n_params * 8  # the per-use block, then the sums


# ---------------------------------------------------------------------- the private step
@pytest.mark.parametrize("kind", list(NETS))
def test_the_private_step_is_clipped_grad_bitwise_with_the_norms_of_the_summed_gradients(kind):
    net = NETS[kind]()
    x, t = _data(kind, net)
    norms = jg.per_sample_grad_norms(net, x, t)
    ps = net.per_sample_grads(x, t).flat  # (B, P): each shared parameter's uses summed per sample
    np.testing.assert_allclose(norms, np.linalg.norm(ps, axis=1), rtol=1e-13)
    C = float(np.median(norms))
    for sigma, seed in ((0.0, None), (1.3, 11)):
        step = _compile(kind, net, clip=C, noise_multiplier=sigma, seed=seed)
        for call in range(2):
            value, r = step(x, t)
            want = net.clipped_grad(x, t, max_norm=C, noise_multiplier=sigma, seed=seed)
            if call == 0 or not sigma:  # the step's generator moves on; clipped_grad's starts again from seed
                assert np.array_equal(r.flat, want.flat), (kind, sigma)
            assert np.array_equal(r.norms, want.norms) and float(r.clipped_fraction) == float(want.clipped_fraction)
            np.testing.assert_allclose(r.norms, norms, rtol=1e-13)
            assert r.flat.shape == (net.n_params,) and value == net.loss_and_grads(x, t)[0]
    c = np.minimum(1.0, C / np.linalg.norm(ps, axis=1))
    np.testing.assert_allclose(_compile(kind, net, clip=C)(x, t)[1].flat, (c[:, None] * ps).sum(axis=0) / B,
                               rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- binding
def test_replacing_a_tied_array_raises_until_rebind_and_a_broken_tie_is_refused():
    net = tied_mlp()
    x, t = _data("mlp", net)
    step = net.compile(B)
    step(x, t)
    W2 = net.weights[0] + 0.25
    for j in range(5):
        net.weights[j] = W2
    with pytest.raises(RuntimeError, match=r"net\.weights\[0\] is no longer the array this step was compiled with"):
        step(x, t)
    step.rebind()  # every use on the new array: the same sharing
    assert np.array_equal(step(x, t)[1].flat, net.loss_and_grads(x, t)[1].flat)
    net.weights[3] = W2.copy()  # one use on an array of its own: a different P
    with pytest.raises(RuntimeError, match=r"net\.weights\[3\] is no longer the array"):
        step(x, t)
    with pytest.raises(ValueError, match=r"net\.weights\[3\] is now not shared; this step was compiled with it "
                                         r"net\.weights\[0\]: the parameter sharing a step sums is fixed"):
        step.rebind()


def test_a_tied_unembedding_rebinds_when_both_uses_move_together():
    net = tied_unembedding()
    x, t = _data("unembedding", net)
    step = net.compile(B, tokens=T)
    emb, head = net.layers[0], net.layers[4]
    E2 = emb.E * 0.5
    emb._E = E2
    with pytest.raises(RuntimeError, match=r"layer 0 .*E is no longer the array|is no longer the array"):
        step(x, t)
    with pytest.raises(ValueError, match=r"layer 4 \(Dense\) W is now not shared; this step was compiled with it "
                                         r"layer 0 \(Embedding\) E transposed"):
        step.rebind()
    head._W = E2.T
    step.rebind()
    value, g = step(x, t)
    ref_value, ref = net.loss_and_grads(x, t)
    assert value == ref_value and np.array_equal(g.flat, ref.flat)
    assert np.array_equal(g.layers[4]["W"], g.layers[0]["E"].T)


# ---------------------------------------------------------------------- the recorded part on a fake GPU
@pytest.mark.parametrize("kind,private", [
    ("mlp", False), ("mlp", True), ("autoencoder", False), ("autoencoder", True), ("tokens", False),
    ("tokens", True), ("unembedding", False), ("unembedding", True)])
def test_the_recorded_part_sums_the_uses_with_no_host_transfer(recording, kind, private):
    """What a capture runs (``step._run`` inside ``direct_cublas()``) on fake device arrays: no
    device-to-host read, no CuPy matmul, and the sums (or the clipped sum) of the eager NumPy pass."""
    host, net = NETS[kind](), NETS[kind](to=recording.asarray)
    x, t = _data(kind, host)
    C = float(np.median(host.per_sample_grad_norms(x, t)))
    step = _compile(kind, net, capture=False, **({"clip": C} if private else {}))
    step(recording.asarray(x), recording.asarray(t))  # warm-up (and loading x, t), outside the block
    recording.reset()
    with _gemm.direct_cublas((0x1000, 1 << 20)):
        step._run(False)
    assert recording.transfers == 0, dict(recording.where)
    assert recording.host.calls  # the GEMMs went through jacgrad's cuBLAS calls
    if private:
        got, want = step._private.sum, host.clipped_grad(x, t, max_norm=C).flat
    else:
        got, want = step._out, host.loss_and_grads(x, t)[1].flat
    got = np.asarray(got.view(np.ndarray))
    assert got.shape == (host.n_params,)
    assert np.linalg.norm(got - want) <= 1e-13 * np.linalg.norm(want)


# ---------------------------------------------------------------------- against torch
def _torch_case(name):
    torch = pytest.importorskip("torch", reason="the references are torch autograd and torch.func")
    from test_bias_free import TiedGPT
    from test_shared_params import TiedLinears, reused_sequential, tied_unembedding as torch_tied_unembedding

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name in ("linears", "reused"):  # b.weight = a.weight; one nn.Linear listed twice in an nn.Sequential
        model = TiedLinears().double() if name == "linears" else reused_sequential()
        x, t = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 2, generator=g, dtype=torch.float64)
        return torch, model, x, t, None
    model = (torch_tied_unembedding() if name == "unembedding" else TiedGPT()).double().eval()
    if name == "gpt":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    V = model[0].num_embeddings if name == "unembedding" else model.wte.num_embeddings
    x = torch.randint(0, V, (B, T), generator=g)
    return torch, model, x, torch.randn(B, T, V, generator=g, dtype=torch.float64), T


def _adam(state, pairs, lr, betas=(0.9, 0.999), eps=1e-4):
    """torch.optim.Adam's update (no weight decay), in NumPy, on ``(array, gradient)`` pairs."""
    state["k"] = k = state.get("k", 0) + 1
    for i, (p, dp) in enumerate(pairs):
        m, v = state.setdefault(i, (np.zeros_like(p), np.zeros_like(p)))
        m[...] = betas[0] * m + (1 - betas[0]) * dp
        v[...] = betas[1] * v + (1 - betas[1]) * dp * dp
        p -= (lr / (1 - betas[0] ** k)) * m / (np.sqrt(v) / np.sqrt(1 - betas[1] ** k) + eps)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["linears", "reused", "unembedding", "gpt"])
def test_training_matches_torch_optim_on_the_tied_torch_model(name, opt):
    """Four steps: the compiled step with an update through ``param_pairs`` against torch autograd
    and ``torch.optim`` on the tied torch model, which holds (and updates) a tied parameter once."""
    torch, model, x, t, tokens = _torch_case(name)
    from test_shared_params import _flat, _layout

    net = jg.from_torch(model, x, copy=True)
    assert net._ties().shared
    layout = _layout(net, model)
    step = net.compile(B, tokens=tokens)
    lr = 0.1 if opt == "sgd" else 0.01
    # Adam divides by √v + eps: a gradient entry near 0 moves by lr·δg/eps for a rounding difference δg, so
    # eps=1e-4 (both sides) keeps that ≤ 100·δg; torch's 1e-8 would amplify float64 rounding to ~1e-10
    optim = (torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd"
             else torch.optim.Adam(model.parameters(), lr=lr, eps=1e-4))
    state, tol = {}, dict(rtol=1e-10, atol=1e-12)
    for _ in range(4):
        value, g = step(x.numpy(), t.numpy())
        optim.zero_grad()
        ref = ((model(x) - t) ** 2).mean()
        ref.backward()
        ref = ref.detach()
        np.testing.assert_allclose(float(value), ref.item(), **tol)
        np.testing.assert_allclose(g.flat, _flat({n: p.grad for n, p in model.named_parameters()}, layout), **tol)
        if opt == "sgd":
            for p, dp in step.param_pairs(g):
                p -= lr * dp
        else:
            _adam(state, step.param_pairs(g), lr)
        optim.step()
        np.testing.assert_allclose(_params(step, g), _flat(dict(model.named_parameters()), layout), **tol)


@pytest.mark.parametrize("name", ["linears", "reused", "unembedding", "gpt"])
def test_the_private_step_matches_torch_func_per_sample_clipping(name):
    """torch.func ``vmap(grad)`` of each sample's loss on the tied model (a tied parameter's gradient
    the sum over its uses), clipped to C and summed: the step's clipped mean and norms (noise-free)."""
    torch, model, x, t, tokens = _torch_case(name)
    from test_shared_params import Ref

    net = jg.from_torch(model, x, copy=True)
    ps = Ref(model, net, x, t).per_sample()
    norms = np.linalg.norm(ps, axis=1)
    C = float(np.median(norms))
    _, r = net.compile(B, tokens=tokens, clip=C)(x.numpy(), t.numpy())
    c = np.minimum(1.0, C / norms)
    np.testing.assert_allclose(r.norms, norms, rtol=1e-10)
    np.testing.assert_allclose(jg.per_sample_grad_norms(net, x.numpy(), t.numpy()), norms, rtol=1e-10)
    np.testing.assert_allclose(r.flat, (c[:, None] * ps).sum(axis=0) / B, rtol=1e-10, atol=1e-13)
    assert 0 < float(r.clipped_fraction) < 1


# ---------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("kind", list(NETS))
def test_gpu_graph_replays_sum_the_uses_as_the_float64_reference(kind, dtype, tol):
    cp = pytest.importorskip("cupy")
    host = NETS[kind]()
    net = NETS[kind](dtype, to=cp.asarray)
    x, t = _data(kind, host)
    C = float(np.median(host.per_sample_grad_norms(x, t)))
    xd = cp.asarray(x if kind == "unembedding" else x.astype(dtype))
    td = cp.asarray(t.astype(dtype))
    rel = lambda a, b: float(np.linalg.norm(jg.to_numpy(a).astype(np.float64) - b) / np.linalg.norm(b))  # noqa: E731
    step, private = _compile(kind, net), _compile(kind, net, clip=C)
    for _ in range(3):  # call 0: warm-up and capture; then replays, the parameters updated in place between
        _, g = step(xd, td)
        _, r = private(xd, td)
        value, hg = host.loss_and_grads(x, t)
        assert rel(g.flat, hg.flat) < tol
        assert rel(r.flat, host.clipped_grad(x, t, max_norm=C).flat) < tol
        _sgd_once_by_memory(host, hg, 0.1)
        for (p, _), (q, _) in zip(_uses(net, g), _uses(host, hg)):
            p[...] = cp.asarray(q.astype(dtype))  # in place: the graph reads the same addresses
    assert step.captured, step.capture_error
    assert private.captured, private.capture_error
