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


@pytest.mark.parametrize("make,shape", [
    (lambda: L.Conv2d(np.ones((4, 3, 3, 3)) / 9, np.zeros(4), stride=2, padding=1, activation="gelu", in_shape=(3, 7, 6)), (3, 7, 6)),
    (lambda: L.Conv2d(np.ones((4, 3, 3, 3)) / 9, None, activation="tanh", in_shape=(3, 7, 6)), (3, 7, 6)),
    (lambda: L.Conv1d(np.ones((4, 2, 3)) / 3, np.ones(4), groups=2, activation="silu", in_shape=(4, 9)), (4, 9)),
    (lambda: L.BatchNorm2d(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), activation="gelu", in_shape=(3, 4, 4)), (3, 4, 4)),
    (lambda: L.BatchNorm1d(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), in_shape=(3,)), (3,)),
    (lambda: L.MaxPool2d(2, in_shape=(3, 4, 5)), (3, 4, 5)),
    (lambda: L.AvgPool2d(3, 1, 1, in_shape=(3, 4, 5)), (3, 4, 5)),
    (lambda: L.AdaptiveAvgPool2d(1, in_shape=(3, 4, 5)), (3, 4, 5)),
    (lambda: L.Flatten(in_shape=(3, 4, 5)), (3, 4, 5)),
])
def test_passes_into_the_buffers_they_name(make, shape):
    """forward/backward into the buffers of forward_shapes/backward_shapes (what a compiled step hands
    them) give what the fresh-array calls give, and the results are those buffers."""
    layer, rng = make(), np.random.default_rng(2)
    x = rng.standard_normal((3,) + shape)
    y0, s0 = layer.forward(x)
    g = rng.standard_normal(y0.shape)
    gr0 = [np.empty_like(p) for p in layer.params]
    gin0, d0 = layer.backward(s0, g, gr0)
    fb = [np.full(s, np.nan) for s in layer.forward_shapes(3)]
    bb = [np.full(s, np.nan) for s in layer.backward_shapes(3)]
    y1, s1 = layer.forward(x, out=fb)
    gr1 = [np.empty_like(p) for p in layer.params]
    gin1, d1 = layer.backward(s1, g.copy(), gr1, out=bb)
    assert y1 is fb[0] and gin1 is bb[-1] and y1.shape == (3,) + layer.out_shape
    for a, b in zip([y1, gin1, d1] + gr1, [y0, gin0, d0] + gr0):
        np.testing.assert_array_equal(a, b)
