"""The Jacobian products' big NumPy stacks come from ``jacgrad.cuda.hostpool`` (fresh ones are
page-faulted in on every call): reused once nothing refers to them, never under a result the
caller kept."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cuda import gemm as _gemm, hostpool

L = jg.layers


def test_empty_pools_big_arrays_only():
    hostpool.release()
    small = hostpool.empty((4, 3), np.float32)
    assert small.shape == (4, 3) and small.dtype == np.float32 and small.base is None  # a plain np.empty
    n = hostpool.MIN_POOLED_BYTES // 8
    big = hostpool.empty((n // 4, 4), np.float64)
    assert big.shape == (n // 4, 4) and big.base is not None and big.base.size == n
    address = big.ctypes.data
    kept = hostpool.empty((n // 4, 4), np.float64)  # big is still referred to: another block
    assert kept.ctypes.data != address
    del big
    assert hostpool.empty((n // 4, 4), np.float64).ctypes.data == address  # back once nothing refers to it


def _blocks_net(seed=0, H=128, blocks=3, n_out=10):
    rng = np.random.default_rng(seed)
    a = lambda *s: rng.standard_normal(s) / np.sqrt(s[0])  # noqa: E731
    layers = [L.Dense(a(H, H), np.zeros(H), "tanh")]
    for k in range(blocks):
        norm = L.LayerNorm(1 + 0.2 * rng.standard_normal(H), 0.1 * rng.standard_normal(H)) if k % 2 == 0 \
            else L.RMSNorm(1 + 0.2 * rng.standard_normal(H))
        layers.append(L.Residual([norm, L.Dense(a(H, H), np.zeros(H), "tanh"), L.Dense(a(H, H), np.zeros(H))], 0.5))
    layers.append(L.Dense(a(H, n_out), np.zeros(n_out)))
    return jg.Sequential(layers)


@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
def test_a_kept_jacobian_is_never_overwritten_and_the_stacks_are_reused(monkeypatch, order):
    monkeypatch.setattr(hostpool, "MIN_POOLED_BYTES", 1 << 18)  # the test's stacks are 0.6 MiB: pool them
    hostpool.release()
    net, rng = _blocks_net(), np.random.default_rng(1)
    x1, x2 = rng.standard_normal((64, 128)), rng.standard_normal((64, 128))
    jac = lambda x: net.jacobian_chain(net.forward(x)[1]).jacobian(order)  # noqa: E731
    made = []
    take = hostpool.take

    def counting(n, dtype):
        before = {id(b) for b in hostpool._blocks}
        block = take(n, dtype)
        made.append(id(block) not in before)
        return block

    monkeypatch.setattr(hostpool, "take", counting)
    J1 = jac(x1)
    assert J1.nbytes >= hostpool.MIN_POOLED_BYTES and any(made)  # big enough to be pooled: it was
    snapshot = J1.copy()
    free = [i for i in range(len(hostpool._blocks)) if hostpool._unused(hostpool._blocks, i)]  # holding no block
    assert free and not any(np.shares_memory(hostpool._blocks[i], J1) for i in free)  # J1's memory is in use
    jac(x2)  # warm: the blocks a call needs besides the one J1 holds
    made.clear()
    for _ in range(4):
        J2 = jac(x2)
        np.testing.assert_array_equal(J1, snapshot)  # kept: untouched by later products
        del J2
    assert made and not any(made), made  # every stack of these calls came back from the pool
    np.testing.assert_array_equal(jac(x1), snapshot)


def test_arrays_beyond_the_cap_are_not_kept(monkeypatch):
    monkeypatch.setattr(hostpool, "MAX_POOLED_BYTES", 1 << 20)
    hostpool.release()
    a = hostpool.empty((1 << 18,), np.float64)  # 2 MiB > the cap
    assert a.base is None and hostpool.nbytes() == 0


def test_host_matmul_is_numpys_product():
    rng = np.random.default_rng(2)
    for a, b in [(rng.standard_normal((300, 200)), rng.standard_normal((200, 150))),
                 (rng.standard_normal((7, 40, 60)), rng.standard_normal((60, 90))),
                 (rng.standard_normal((40, 60)), rng.standard_normal((7, 60, 90))),
                 (rng.standard_normal(60), rng.standard_normal((60, 3))),
                 (np.arange(6).reshape(2, 3), np.arange(6).reshape(3, 2))]:
        np.testing.assert_array_equal(_gemm.matmul(a, b), a @ b)
