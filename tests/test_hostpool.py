"""jacgrad.cuda.hostpool: blocks come back only when nothing refers to them; results never alias."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import hostpool


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(hostpool, "capacity", 8)
    hostpool.release()
    yield
    hostpool.release()


def test_a_block_returns_only_after_every_view_of_it_is_gone():
    a = hostpool.take(64, np.float64)
    address = a.ctypes.data
    view = a[8:24].reshape(4, 4)  # a view of a view: its base is the block itself
    del a
    other = hostpool.take(64, np.float64)
    assert other.ctypes.data != address  # the view still holds the first block
    del view
    assert hostpool.take(64, np.float64).ctypes.data == address  # `other` is alive: not that one
    assert hostpool.take(64, np.float32).ctypes.data != address  # same bytes, other dtype: not shared


def test_kept_results_are_never_overwritten_by_later_calls(rng):
    net = jg.MLP.init([6, 9, 7, 3], seed=0, bias_std=0.2)
    x1, x2, t = rng.standard_normal((5, 6)), rng.standard_normal((5, 6)), rng.standard_normal((5, 3))
    _, g1 = net.loss_and_grads(x1, t)
    y1, cache1 = net.forward(x1)
    snapshot = [a.copy() for a in (*g1.weights, *g1.biases, *g1.deltas, y1, *cache1.saved)]
    for _ in range(12):  # more calls than the pool remembers blocks
        _, g2 = net.loss_and_grads(x2, t)
        net.forward(x2)
    for a, b in zip((*g1.weights, *g1.biases, *g1.deltas, y1, *cache1.saved), snapshot):
        np.testing.assert_array_equal(a, b)
    assert not np.shares_memory(g1.flat, g2.flat)


def test_a_training_loop_reuses_the_blocks_of_finished_steps(rng):
    net = jg.MLP.init([16, 32, 32, 4], seed=1)
    x, t = rng.standard_normal((8, 16)), rng.standard_normal((8, 4))
    addresses = set()
    for _ in range(6):
        _, g = net.loss_and_grads(x, t)
        addresses.add(g.flat.ctypes.data)
        del g
    assert len(addresses) <= 2  # after the first step or two, the same gradient block every step
    assert hostpool.nbytes() > 0
    hostpool.release()
    assert hostpool.nbytes() == 0


def test_capacity_zero_turns_pooling_off(monkeypatch):
    monkeypatch.setattr(hostpool, "capacity", 0)
    a = hostpool.take(32, np.float64)
    del a
    assert hostpool.nbytes() == 0


def test_a_torch_tensor_made_from_a_result_keeps_its_block(rng):
    torch = pytest.importorskip("torch")
    net = jg.MLP.init([4, 5, 2], seed=0)
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 2))
    _, g = net.loss_and_grads(x, t)
    tensor = torch.from_numpy(g.weights[0])  # shares memory with the block
    expect = tensor.clone()
    del g
    for _ in range(4):
        net.loss_and_grads(2 * x, t)
    assert torch.equal(tensor, expect)


def test_without_exact_reference_counts_nothing_is_reused(monkeypatch):
    monkeypatch.setattr(hostpool, "_FREE_REFS", None)  # as on a free-threaded build
    a = hostpool.take(16, np.float64)
    address = a.ctypes.data
    keep = [hostpool.take(16, np.float64) for _ in range(3)]  # a is free now, but may not come back
    del a
    assert all(k.ctypes.data != address for k in keep) and hostpool.take(16, np.float64).ctypes.data != address


def test_the_import_time_calibration_reads_one_reference_per_holder():
    assert hostpool._FREE_REFS is not None  # CPython with the GIL: exact counts
    blocks = [np.empty(3)]
    assert hostpool._unused(blocks, 0)
    view = blocks[0][1:]
    assert not hostpool._unused(blocks, 0)
    del view
    assert hostpool._unused(blocks, 0)
