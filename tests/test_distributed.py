"""jacgrad.distributed on Dask's local scheduler and on NumPy batches in chunks: results equal
the single-batch computation, the network enters a graph once, the chunk planner keeps every
task under its budget, and dataset files are checked with one-line errors."""

import io
import pickle
import tracemalloc

import numpy as np
import pytest

import jacgrad as jg
import jacgrad.distributed  # noqa: F401  (registers the Dask handler; jacgrad imports it too)

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
jd = jg.distributed
budget = jd.budget


@pytest.fixture(scope="module")
def net():
    return jg.MLP.init([7, 9, 8, 3], activation="tanh", bias_std=0.1, seed=3)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(5).standard_normal((103, 7))


def _chain(net, x):
    return net.jacobian_chain(net.forward(x)[1])


def _row_losses(net, x, t, loss="mse"):
    """Per-sample loss, one sample at a time through jg.losses (a reference, not the mapper)."""
    y = net(x)
    return np.array([float(jg.losses.get(loss)(y[i : i + 1], t[i : i + 1])[0]) for i in range(len(x))])


# ----------------------------------------------------------------------------- results
def test_dask_results_equal_the_single_batch_computation(net, x):
    X = da.from_array(x, chunks=(25, 3))  # the feature axis chunked too: it is rechunked
    s = jd.jacobian_spectral_norm(net, X)
    sv = jd.jacobian_singular_values(net, X)
    sv2 = jd.jacobian_singular_values(net, X, k=2)
    Y = net(X)
    for lazy in (s, sv, sv2, Y):
        assert isinstance(lazy, da.Array)
        assert lazy.chunks[0] == (25, 25, 25, 25, 3)
    chain = _chain(net, x)
    np.testing.assert_allclose(s.compute(), chain.spectral_norm(), rtol=1e-12)
    np.testing.assert_allclose(sv.compute(), chain.singular_values(), rtol=1e-12)
    np.testing.assert_allclose(sv2.compute(), chain.singular_values()[:, :2], rtol=1e-12)
    np.testing.assert_allclose(Y.compute(), net(x), rtol=1e-13)
    assert Y.shape == (103, 3) and sv.shape == (103, 3) and s.shape == (103,)


def test_spectral_norm_matches_finite_differences(net, x):
    """Independent of Chain: the SVD of the central-difference Jacobian of a few samples."""
    s = jd.jacobian_spectral_norm(net, da.from_array(x[:4], chunks=(2, -1))).compute()
    for i in range(4):
        J = jg.check.numerical_jacobian(lambda v: net(v[None])[0], x[i])
        assert s[i] == pytest.approx(np.linalg.norm(J, 2), rel=1e-7)


def test_float32_stays_float32(x):
    net32 = jg.MLP.init([7, 5, 2], seed=0, dtype="float32")
    X = da.from_array(x.astype(np.float32), chunks=(50, -1))
    for out in (jd.jacobian_spectral_norm(net32, X), net32(X), jd.jacobian_singular_values(net32, X)):
        assert out.dtype == np.float32 and out.compute().dtype == np.float32


# ----------------------------------------------------------------------------- the network once
class _CountingPickler(pickle.Pickler):
    def __init__(self, target):
        super().__init__(io.BytesIO())
        self.target, self.hits = target, 0

    def persistent_id(self, obj):
        if obj is self.target:
            self.hits += 1
            return "net"
        return None


def _tasks_holding(lazy, net) -> tuple[int, int]:
    graph = dict(lazy.__dask_graph__())
    holding = 0
    for task in graph.values():  # each task as it would be shipped on its own
        p = _CountingPickler(net)
        p.dump(task)
        holding += p.hits > 0
    return holding, len(graph)


def test_the_network_enters_the_graph_once(net, x):
    X = da.from_array(x, chunks=(10, -1))  # 11 chunks
    t = np.zeros((103, 3))
    for lazy in (net(X), jd.jacobian_spectral_norm(net, X), jd.jacobian_singular_values(net, X, k=1),
                 jd.map_samples(_row_losses, net, X, t), jd.reduce_samples(_sum_stat, _merge, _finish, net, X)):
        holding, tasks = _tasks_holding(lazy, net)
        assert tasks > 11 and holding == 1


def test_a_changed_network_gets_a_new_key(x):
    net = jg.MLP.init([7, 4, 2], seed=1)
    X = da.from_array(x, chunks=(50, -1))
    before = net(X)
    net.weights[0] *= 2.0  # in place: the key hashes the values
    after = net(X)
    assert before.name != after.name or set(before.dask) != set(after.dask)
    np.testing.assert_allclose(after.compute(), net(x), rtol=1e-13)


# ----------------------------------------------------------------------------- the planner
def test_split_chunks_cuts_only_the_chunks_above_the_budget():
    assert budget.split_chunks((10, 3, 25), 10) == (10, 3, 9, 8, 8)
    rng = np.random.default_rng(0)
    for _ in range(200):
        chunks = tuple(int(c) for c in rng.integers(1, 60, size=rng.integers(1, 6)))
        rows = int(rng.integers(1, 30))
        out = budget.split_chunks(chunks, rows)
        assert sum(out) == sum(chunks) and max(out) <= rows and min(out) >= 1
        for c in chunks:  # each chunk becomes ceil(c / rows) pieces of sizes differing by at most one
            pieces, out = out[: -(-c // rows)], out[-(-c // rows):]
            assert sum(pieces) == c and max(pieces) - min(pieces) <= 1


def test_rows_per_task_and_a_sample_above_the_budget():
    assert budget.rows_per_task(100, 1000) == 10
    assert budget.rows_per_task(100, 1099) == 10
    with pytest.raises(MemoryError, match="one sample needs about"):
        budget.rows_per_task(2000, 1000)
    with pytest.raises(ValueError, match="max_memory must be a number of bytes > 0"):
        budget.rows_per_task(10, 0)


def test_dask_chunks_above_max_memory_are_split(net, x):
    X = da.from_array(x, chunks=(60, -1))
    per = budget.jacobian_bytes(net)
    s = jd.jacobian_spectral_norm(net, X, max_memory=20 * per)
    assert s.chunks[0] == (20, 20, 20, 15, 14, 14)
    np.testing.assert_allclose(s.compute(), _chain(net, x).spectral_norm(), rtol=1e-12)


def test_numpy_batches_above_max_memory_are_computed_in_chunks(net, x):
    calls = []

    def rows_seen(n, xb):
        calls.append(xb.shape[0])
        return _chain(n, xb).spectral_norm()

    per = budget.jacobian_bytes(net)
    s = jd.map_samples(rows_seen, net, x, bytes_per_sample=budget.jacobian_bytes, max_memory=30 * per)
    assert isinstance(s, np.ndarray) and calls == [30, 30, 30, 13]
    np.testing.assert_allclose(s, _chain(net, x).spectral_norm(), rtol=1e-12)
    for f, ref in ((jd.jacobian_singular_values, _chain(net, x).singular_values()), (jd.forward, net(x))):
        np.testing.assert_allclose(f(net, x, max_memory=7 * per), ref, rtol=1e-12)
    calls.clear()
    jd.map_samples(rows_seen, net, x, max_memory=1 << 30)  # fits: one call on the whole batch
    assert calls == [103]


_TARGETS = np.zeros((200, 64))


@pytest.mark.parametrize("estimate,run", [
    (budget.forward_bytes, lambda n, x: n.forward(x)),
    (budget.backward_bytes, lambda n, x: n.loss_and_grads(x, _TARGETS[: len(x), : n.sizes[-1]])),
    (budget.jacobian_bytes, lambda n, x: _chain(n, x).singular_values()),
])
def test_the_estimates_bound_the_memory_a_chunk_allocates(estimate, run):
    """tracemalloc sees NumPy's allocations: the peak of one chunk stays within its estimate."""
    for sizes in ([50, 40, 30, 6], [6, 30, 40, 50], [20, 64, 8, 64, 20]):
        net = jg.MLP.init(sizes, seed=0)
        x = np.random.default_rng(0).standard_normal((200, sizes[0]))
        run(net, x[:2])  # warm caches outside the measurement
        tracemalloc.start()
        run(net, x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 200 * estimate(net) + (64 << 10), (sizes, peak, 200 * estimate(net))


def test_default_max_memory_is_a_share_of_free_ram():
    free = budget.free_ram()
    assert 0 < budget.default_max_memory(np.ones(3)) <= budget.FRACTION * free * 1.01 + 1
    local = budget.default_max_memory(da.ones(3))
    assert 0 < local <= budget.default_max_memory(np.ones(3)) * 1.01 + 1


# ----------------------------------------------------------------------------- any per-sample function
def test_map_samples_with_targets_in_other_chunks(net, x):
    t = np.random.default_rng(1).standard_normal((103, 3))
    X = da.from_array(x, chunks=(40, -1))
    for T in (t, da.from_array(t, chunks=(17, 2)), t.tolist()):
        out = jd.map_samples(_row_losses, net, X, T)
        assert out.chunks == ((40, 40, 23),)
        np.testing.assert_allclose(out.compute(), _row_losses(net, x, t), rtol=1e-13)


def test_map_samples_with_integer_labels_and_an_output_axis(net, x):
    labels = np.random.default_rng(2).integers(0, 3, 103)
    X = da.from_array(x, chunks=(30, -1))

    def losses_and_outputs(n, xb, lb):
        return np.concatenate([_row_losses(n, xb, lb, "softmax_cross_entropy")[:, None], n(xb)], axis=1)

    out = jd.map_samples(losses_and_outputs, net, X, da.from_array(labels, chunks=50), out_shape=(4,))
    assert out.shape == (103, 4) and out.chunks[1] == (4,)
    np.testing.assert_allclose(out.compute(), losses_and_outputs(net, x, labels), rtol=1e-13)


def test_map_samples_errors_name_what_is_wrong(net, x):
    X = da.from_array(x, chunks=(50, -1))

    def wrong(n, xb):
        return n(xb)  # (b, 3) where (b,) is declared

    with pytest.raises(ValueError, match=r"wrong returned shape \(\d+, 3\) for a chunk of \d+ samples; expected \(\d+,\)"):
        jd.map_samples(wrong, net, X).compute()
    with pytest.raises(ValueError, match=r"X has shape \(103, 6\) but the network takes \(N, 7\)"):
        jd.map_samples(_row_losses, net, x[:, :6])
    with pytest.raises(ValueError, match="has 103 samples"):
        jd.map_samples(_row_losses, net, X, np.zeros((100, 3)))
    with pytest.raises(TypeError, match="dtype int64"):
        jd.jacobian_spectral_norm(net, X.astype(np.int64))
    with pytest.raises(ValueError, match="k must be in"):
        jd.jacobian_singular_values(net, X, k=4)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        jd.jacobian_spectral_norm(net, X[X[:, 0] > 0])
    with pytest.raises(TypeError, match="in-memory batch"):
        net.forward(X)


class _NetWithNorms(jg.MLP):
    """Stands in for ``per_sample_grad_norms`` (another issue): ‖∂l_i/∂θ‖ one sample at a time."""

    def per_sample_grad_norms(self, x, t, loss="mse", per_layer=False):
        rows = []
        for i in range(len(x)):
            g = self.loss_and_grads(x[i : i + 1], t[i : i + 1], loss=loss)[1]
            per = [np.sqrt(np.sum(W**2) + np.sum(b**2)) for W, b in zip(g.weights, g.biases)]
            rows.append(per if per_layer else np.linalg.norm(g.flat))
        return np.array(rows)


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_network_method_takes_dask_arrays_through_the_hook(net, x, per_layer):
    sub = _NetWithNorms(net.weights, net.biases, net.activations)
    t = np.random.default_rng(3).standard_normal((103, 3))
    X = da.from_array(x, chunks=(50, -1))
    out = jd.lazy_method("per_sample_grad_norms", sub, X, t, per_layer=per_layer)
    assert isinstance(out, da.Array) and out.shape == ((103, 3) if per_layer else (103,))
    np.testing.assert_allclose(out.compute(), sub.per_sample_grad_norms(x, t, per_layer=per_layer), rtol=1e-13)
    with pytest.raises(TypeError, match="takes in-memory arrays only"):
        jd.lazy_method("backward", sub, X)


# ----------------------------------------------------------------------------- reductions
def _sum_stat(net, xb):
    y = net(xb)
    return {"n": len(xb), "sum": y.sum(0), "sq": (y * y).sum(0), "max": y.max(0)}


def _merge(a, b):
    return {"n": a["n"] + b["n"], "sum": a["sum"] + b["sum"], "sq": a["sq"] + b["sq"],
            "max": np.maximum(a["max"], b["max"])}


def _finish(p):
    mean = p["sum"] / p["n"]
    return {"n": p["n"], "mean": mean, "var": p["sq"] / p["n"] - mean**2, "max": p["max"]}


@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_reduce_samples_dask_and_numpy_agree(net, x, split_every):
    per = budget.backward_bytes(net)
    lazy = jd.reduce_samples(_sum_stat, _merge, _finish, net, da.from_array(x, chunks=(20, -1)),
                             max_memory=10 * per, split_every=split_every)
    eager = jd.reduce_samples(_sum_stat, _merge, _finish, net, x, max_memory=10 * per, split_every=split_every)
    got = lazy.compute()
    y = net(x)
    assert got["n"] == eager["n"] == 103
    for key in ("mean", "var", "max"):
        np.testing.assert_array_equal(got[key], eager[key])  # same chunks, same tree: same bits
    np.testing.assert_allclose(got["mean"], y.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["var"], y.var(0), rtol=1e-10)
    np.testing.assert_array_equal(got["max"], y.max(0))
    with pytest.raises(ValueError, match="split_every"):
        jd.reduce_samples(_sum_stat, _merge, _finish, net, x, split_every=1)


def test_reduce_samples_with_targets(net, x):
    t = np.random.default_rng(4).standard_normal((103, 3))

    def total(n, xb, tb):
        return float(_row_losses(n, xb, tb).sum())

    lazy = jd.reduce_samples(total, lambda a, b: a + b, lambda s: s / 103, net, da.from_array(x, chunks=(25, -1)), t)
    assert lazy.compute() == pytest.approx(float(jg.losses.mse(net(x), t)[0]), rel=1e-12)


# ----------------------------------------------------------------------------- where it runs
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_compute_on_the_local_scheduler_with_a_progress_bar(net, x):
    X = da.from_array(x, chunks=(25, -1))
    terminal = _Terminal()
    with jd.session(progress=terminal):
        jd.compute(net(X))
    assert "100% Completed" in terminal.getvalue()  # a terminal: Dask's bar
    stream = io.StringIO()
    with jd.session(progress=stream) as client:
        assert client is None
        s, y = jd.compute(jd.jacobian_spectral_norm(net, X), net(X))
    assert "\r" not in stream.getvalue() and "tasks done (100%)" in stream.getvalue()  # else plain lines
    np.testing.assert_allclose(s, _chain(net, x).spectral_norm(), rtol=1e-12)
    np.testing.assert_allclose(y, net(x), rtol=1e-13)
    (again,) = jd.compute(net(X))  # outside a session: no bar
    np.testing.assert_array_equal(again, y)


def test_session_arguments_are_checked():
    with pytest.raises(ValueError, match="not both"):
        with jd.session(workers=2, scheduler="tcp://127.0.0.1:8786"):
            pass
    with pytest.raises(ValueError, match="workers must be a positive number"):
        with jd.session(workers=0):
            pass


@pytest.mark.gpu
def test_cupy_chunks_run_the_cupy_path(x):
    """X.map_blocks(cupy.asarray) with a GPU network: CuPy blocks in, CuPy blocks out, the budget
    from the GPU's free memory. (Written without a GPU at hand: it runs where one is usable.)"""
    cp = pytest.importorskip("cupy")
    net = jg.MLP.init([7, 9, 8, 3], activation="tanh", bias_std=0.1, seed=3)
    gnet = net.to("gpu")
    X = da.from_array(x, chunks=(25, -1)).map_blocks(cp.asarray)
    s, y = jd.jacobian_spectral_norm(gnet, X), gnet(X)
    assert type(s._meta).__module__.startswith("cupy")
    got_s, got_y = s.compute(), y.compute()
    assert isinstance(got_s, cp.ndarray) and isinstance(got_y, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(got_s), _chain(net, x).spectral_norm(), rtol=1e-10)
    np.testing.assert_allclose(cp.asnumpy(got_y), net(x), rtol=1e-10)
    free = cp.cuda.Device().mem_info[0]
    assert 0 < jd.default_max_memory(X) <= budget.FRACTION * free * 1.1
    chunked = jd.jacobian_spectral_norm(gnet, cp.asarray(x), max_memory=10 * budget.jacobian_bytes(net))
    np.testing.assert_allclose(cp.asnumpy(chunked), _chain(net, x).spectral_norm(), rtol=1e-10)


def test_reduce_samples_can_pass_each_chunks_first_row(net, x):
    """A statistic seeded by the global row (a random cotangent per sample) is the same
    whatever the chunking: the chunk knows where it starts."""

    def seeded(n, xb, start):
        v = np.stack([np.random.default_rng([7, start + i]).standard_normal(n.sizes[-1]) for i in range(len(xb))])
        return [(start, float((n(xb) * v).sum()))]

    per = budget.backward_bytes(net)
    results = [jd.reduce_samples(seeded, lambda a, b: a + b, lambda p: p, net, X, max_memory=m * per, with_start=True)
               for X, m in ((x, 13), (x, 1000), (da.from_array(x, chunks=(30, -1)), 1000), (da.from_array(x, chunks=(30, -1)), 7))]
    results = [r.compute() if hasattr(r, "compute") else r for r in results]
    assert [s for s, _ in results[0]] == list(range(0, 103, 13))
    assert [s for s, _ in results[3]] == [0, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 66, 72, 78, 84, 90, 97]
    totals = [sum(t for _, t in r) for r in results]
    assert max(totals) - min(totals) < 1e-9 * max(abs(t) for t in totals)


def test_two_networks_in_one_graph_keep_their_own_keys(x):
    """Results of different networks (or inputs) computed together must not share task keys."""
    a, b = jg.MLP.init([7, 5, 2], seed=1), jg.MLP.init([7, 5, 2], seed=2)
    X = da.from_array(x, chunks=(50, -1))
    got = dask.compute(jd.jacobian_spectral_norm(a, X), jd.jacobian_spectral_norm(b, X), a(X), b(X), a(X[:60]))
    want = (_chain(a, x).spectral_norm(), _chain(b, x).spectral_norm(), a(x), b(x), a(x[:60]))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)



def test_the_network_key_follows_everything_pickled_in_the_network():
    W = [np.random.default_rng(0).standard_normal((7, 5)), np.random.default_rng(1).standard_normal((5, 2))]
    same = [jd.embed(jg.MLP([w.copy() for w in W], activations="tanh")).key for _ in range(2)]
    assert same[0] == same[1]  # deterministic: a rebuilt graph reuses the key
    other = jg.MLP(W, activations=["tanh", "sigmoid"])
    assert jd.embed(other).key != same[0]
    other.biases[1][0] = 1.0
    assert jd.embed(other).key not in (same[0], jd.embed(jg.MLP(W, activations=["tanh", "sigmoid"])).key)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_per_sample_grad_norms_of_a_dask_batch_equal_one_sample_at_a_time(net, x, per_layer, loss):
    """The real method through the hook: lazy (N,) / (N, L), each row the norm of the gradient of that
    sample's own loss, computed here one sample at a time with loss_and_grads (a batch of one)."""
    rng = np.random.default_rng(4)
    t = rng.standard_normal((103, 3)) if loss == "mse" else rng.integers(0, 3, 103)
    X = da.from_array(x, chunks=(40, -1))
    out = net.per_sample_grad_norms(X, t, loss=loss, per_layer=per_layer)
    assert isinstance(out, da.Array) and out.shape == ((103, 3) if per_layer else (103,))
    ref = _NetWithNorms.per_sample_grad_norms(net, x, t, loss=loss, per_layer=per_layer)
    np.testing.assert_allclose(out.compute(), ref, rtol=1e-11)
