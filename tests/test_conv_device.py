"""The convolutional family on (fake) CuPy arrays: the same numbers as on NumPy, results on the
device, and no host transfer in forward, backward, JVP or VJP (tests/fake_cupy_transfers.py: every
``.get()``/``float()``/``bool()`` of jacgrad's code on a device array is counted)."""

import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_transfers import install

pytestmark = pytest.mark.usefixtures("one_blas_thread")
L = jg.layers


def _cnn(to, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: to(rng.standard_normal(s))
    return [L.Conv2d(r(4, 3, 3, 3), r(4), padding="same", activation="relu"),
            L.BatchNorm2d(r(4), r(4), r(4), to(np.full(4, 1.5)), activation="tanh"),
            L.MaxPool2d(2), L.Conv2d(r(6, 2, 2, 2), None, groups=2, activation="gelu"), L.AvgPool2d(2, 1),
            L.AdaptiveAvgPool2d(1), L.Flatten(), L.Dense(r(6, 3), r(3)),
            ]


def _run(layers, x, g, u, v):
    z, states = x, []
    for layer in layers:
        z, st = layer.forward(z)
        states.append(st)
    chain = jg.Chain([layer.factor(st) for layer, st in zip(layers, states)])
    ju, jv = chain.jvp(u), chain.vjp(v)
    grads = [[p * 0 for p in layer.params] for layer in layers]
    for layer, st, gr in zip(reversed(layers), reversed(states), reversed(grads)):
        g, _ = layer.backward(st, g, gr)
    return [z, g, ju, jv] + [a for gr in grads for a in gr]


def test_cnn_on_device_arrays_matches_numpy_without_host_transfers(monkeypatch):
    fake = install(monkeypatch)
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3))
    u, v = rng.standard_normal((2, 192)), rng.standard_normal((2, 3))
    ref = _run(_cnn(np.asarray), x, g, u, v)
    dev = _cnn(fake.asarray)
    args = [fake.asarray(a) for a in (x, g, u, v)]
    fake.reset()
    out = _run(dev, *args)
    assert fake.transfers == 0, dict(fake.where)
    for a, b in zip(out, ref):
        assert type(a).__module__ == "cupy"
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-13, atol=1e-13)
