"""Sequential.per_sample_grad_norms with a Dask batch: lazy in, lazy out (jacgrad.distributed
maps the method over the chunks), equal to the in-memory computation; also on a one-process
local cluster, which ships the pickled network to its worker."""

import numpy as np
import pytest

import jacgrad as jg

da = pytest.importorskip("dask.array")


@pytest.fixture
def net():
    rng = np.random.default_rng(0)
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)  # noqa: E731
    L = jg.layers
    return jg.Sequential([
        L.Dense(W(3, 5), rng.standard_normal(5), "tanh"),
        L.Residual([L.LayerNorm(1 + 0.3 * rng.standard_normal(5), rng.standard_normal(5)),
                    L.Dense(W(5, 7), None, "gelu"), L.Dense(W(7, 5))], 0.5),
        L.RMSNorm(1 + 0.3 * rng.standard_normal(5)), L.Dense(W(5, 2))])


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((23, 3)), rng.standard_normal((23, 2)), rng.integers(0, 2, size=23)


@pytest.mark.parametrize("per_layer", [False, True])
def test_dask_in_dask_out_equal_to_numpy(net, data, per_layer):
    x, t, labels = data
    X, T = da.from_array(x, chunks=(7, 3)), da.from_array(t, chunks=(7, 2))
    lazy = net.per_sample_grad_norms(X, T, per_layer=per_layer)
    assert isinstance(lazy, da.Array)
    assert lazy.shape == ((23, 4) if per_layer else (23,)) and lazy.chunks[0] == (7, 7, 7, 2)
    # per-sample norms do not depend on the chunking: each chunk is its own batch, the norms are per sample
    np.testing.assert_allclose(lazy.compute(), net.per_sample_grad_norms(x, t, per_layer=per_layer), rtol=1e-12)
    got = net.per_sample_grad_norms(X, labels, loss="softmax_cross_entropy").compute()
    np.testing.assert_allclose(got, net.per_sample_grad_norms(x, labels, loss="softmax_cross_entropy"), rtol=1e-12)


def test_under_a_local_cluster(net, data):
    distributed = pytest.importorskip("distributed")
    x, t, _ = data
    X, T = da.from_array(x, chunks=(12, 3)), da.from_array(t, chunks=(12, 2))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster) as client:
        got = client.compute(net.per_sample_grad_norms(X, T)).result()  # the net pickled to a worker process
    np.testing.assert_allclose(got, net.per_sample_grad_norms(x, t), rtol=1e-12)


def test_the_budget_counts_the_layers_inside_residual_blocks():
    from jacgrad.distributed import budget

    L = jg.layers
    wide = jg.Sequential([L.Dense(np.ones((3, 4))), L.Residual([L.Dense(np.ones((4, 64))), L.Dense(np.ones((64, 4)))]),
                          L.Dense(np.ones((4, 2)))])
    # saved per sample: 4 (dense) + 4 (block output) + 2 (head), and 64 + 4 inside the block
    assert budget.forward_bytes(wide) == 8 * (3 + 4 + 4 + 2 + 64 + 4)
    assert budget.backward_bytes(wide) == 8 * (2 * 3 + 3 * (4 + 4 + 2 + 64 + 4) + 3 * 2)
    mlp = jg.MLP.init([3, 4, 2], seed=0)  # unchanged for a dense stack
    assert budget.forward_bytes(mlp) == 8 * (3 + 4 + 2)
