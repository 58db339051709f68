"""Sequential's parameter-space products on device arrays (the fake CuPy of
tests/fake_cupy_transfers.py): results stay on the device, no host transfer is made, and the
numbers equal the NumPy ones."""

import numpy as np
import pytest

import jacgrad as jg

from fake_cupy_transfers import install

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _net(to):
    rng = np.random.default_rng(0)
    L = jg.layers
    W = lambda a, b: to(rng.standard_normal((a, b)) / np.sqrt(a))  # noqa: E731
    return jg.Sequential([
        L.Dense(W(3, 5), to(rng.standard_normal(5)), "tanh"),
        L.Residual([L.LayerNorm(to(1 + 0.2 * rng.standard_normal(5)), to(rng.standard_normal(5))),
                    L.Dense(W(5, 5), None, "gelu")], 0.5),
        L.RMSNorm(to(np.ones(5))), L.Dense(W(5, 2))])


CALLS = {
    "per_sample_grad_norms": lambda net, x, t, v: net.per_sample_grad_norms(x, t, per_layer=True),
    "per_sample_grads": lambda net, x, t, v: net.per_sample_grads(x, t).flat,
    "ggn_vp": lambda net, x, t, v: net.ggn_vp(x, v, target=t),
    "ggn_diagonal": lambda net, x, t, v: net.ggn_diagonal(x).flat,
    "ntk": lambda net, x, t, v: jg.ntk(net, x),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_on_device_without_host_transfers(name, monkeypatch):
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    v = rng.standard_normal(_net(np.asarray).n_params)
    want = CALLS[name](_net(np.asarray), x, t, v)
    fake = install(monkeypatch)
    net = _net(fake.asarray)
    fake.reset()
    got = CALLS[name](net, fake.asarray(x), fake.asarray(t), fake.asarray(v))
    assert jg.backend.is_gpu_array(got)
    assert fake.transfers == 0, dict(fake.where)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
