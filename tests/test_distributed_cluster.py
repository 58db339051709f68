"""jacgrad.distributed on a real two-process cluster (distributed.LocalCluster with nannies):
results equal the single-process NumPy computation, the budget reads the workers' memory, and a
worker killed mid-computation does not change the result (Dask recomputes what it held)."""

import collections
import io
import os
import signal
import time

import numpy as np
import pytest

import jacgrad as jg
import jacgrad.distributed as jd

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, memory_limit="2GiB")
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def case():
    """The network, the data and the single-process NumPy results the cluster must reproduce."""
    net = jg.MLP.init([12, 16, 16, 4], activation="tanh", bias_std=0.1, seed=7)
    x = np.random.default_rng(8).standard_normal((400, 12))
    chain = net.jacobian_chain(net.forward(x)[1])
    return net, x, {"norms": chain.spectral_norm(), "sv": chain.singular_values(), "y": net(x)}


def test_per_sample_results_equal_one_process(client, case):
    net, x, ref = case
    X = da.from_array(x, chunks=(50, 6))
    t = np.random.default_rng(9).standard_normal((400, 4))
    s, sv, y, losses = client.compute([
        jd.jacobian_spectral_norm(net, X), jd.jacobian_singular_values(net, X, k=3), net(X),
        jd.map_samples(_row_mse, net, X, da.from_array(t, chunks=(80, -1))),
    ], sync=True)
    np.testing.assert_allclose(s, ref["norms"], rtol=1e-12)
    np.testing.assert_allclose(sv, ref["sv"][:, :3], rtol=1e-12)
    np.testing.assert_allclose(y, ref["y"], rtol=1e-13)
    np.testing.assert_allclose(losses, [float(jg.losses.mse(net(x[i : i + 1]), t[i : i + 1])[0]) for i in range(400)],
                               rtol=1e-13)
    assert len(client.scheduler_info()["workers"]) == 2


def _row_mse(net, xb, tb):
    return ((net(xb) - tb) ** 2).mean(axis=1)


def _moments(net, xb):
    y = net(xb)
    return len(xb), y.sum(0), y.max(0)


def _merge(a, b):
    return a[0] + b[0], a[1] + b[1], np.maximum(a[2], b[2])


def test_a_reduction_equals_one_process(client, case):
    net, x, ref = case
    lazy = jd.reduce_samples(_moments, _merge, lambda p: (p[1] / p[0], p[2]), net, da.from_array(x, chunks=(25, -1)))
    mean, peak = client.compute(lazy, sync=True)
    np.testing.assert_allclose(mean, ref["y"].mean(0), rtol=1e-12)
    np.testing.assert_array_equal(peak, ref["y"].max(0))


def test_the_default_budget_is_a_share_of_a_worker_thread(client):
    assert jd.default_max_memory(da.ones(3)) == int(jd.budget.FRACTION * 2 * 2**30)


class _Slow:
    """A per-sample function slow enough that a worker can be killed while the graph runs."""

    __name__ = "slow_spectral_norm"

    def __call__(self, net, xb):
        time.sleep(0.05)
        return net.jacobian_chain(net.forward(xb)[1]).spectral_norm()


def test_a_worker_killed_mid_computation_does_not_change_the_result(client, case):
    net, x, ref = case
    X = da.from_array(x, chunks=(10, -1))  # 40 tasks of ~50 ms on two workers
    lazy = jd.map_samples(_Slow(), net, X)
    future = client.compute(lazy)
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 20
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # some tasks done, the rest running or queued
    assert not future.done()
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    s = future.result(timeout=60)
    ours = {k for k in lazy.__dask_keys__()}
    started = collections.Counter(t.key for t in client.cluster.scheduler.transition_log
                                  if t.finish == "processing" and t.key in ours)
    assert max(started.values()) >= 2  # tasks the dead worker ran or held were run again
    np.testing.assert_allclose(s, ref["norms"], rtol=1e-12)
    client.wait_for_workers(2, timeout=30)
    assert victim not in client.run(os.getpid).values()  # the nanny started a new worker process


def test_compute_on_the_active_client_with_a_progress_bar(client, case):
    net, x, ref = case
    stream = io.StringIO()
    X = da.from_array(x, chunks=(100, -1))
    with jd.session(scheduler=client.scheduler.address, progress=stream) as other:
        assert other is not None and other is not client
        (s,) = jd.compute(jd.jacobian_spectral_norm(net, X))
    assert "tasks done (100%)" in stream.getvalue()  # not a terminal: plain lines
    np.testing.assert_allclose(s, ref["norms"], rtol=1e-12)
    assert jd.budget.active_client() is client  # the session's client is closed, the fixture's is back


def test_an_unreachable_scheduler_is_one_line():
    with pytest.raises(ConnectionError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9: "):
        with jd.session(scheduler="tcp://127.0.0.1:9", timeout=1):
            pass
