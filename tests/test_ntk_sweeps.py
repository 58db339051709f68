"""jg.ntk sweeps each row chunk's side once, not once per column block: with c chunks a
symmetric kernel takes c + c(c-1)/2 forward passes (one per row chunk, one per block above the
diagonal), a kernel of two inputs c1 + c1·c2."""

import importlib

import numpy as np
import pytest

import jacgrad as jg
ntk_module = importlib.import_module("jacgrad.params.ntk")  # jacgrad.params.ntk is also the name of the function


def _counted(net, monkeypatch):
    calls = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x, *a, **k: calls.append(len(x)) or forward(x, *a, **k),
                        raising=False)
    return calls


@pytest.mark.parametrize("kind", ["mlp", "sequential"])
def test_each_side_is_swept_once_per_chunk(kind, monkeypatch):
    mlp = jg.MLP.init([3, 6, 2], activation="tanh", seed=0)
    net = mlp if kind == "mlp" else jg.Sequential([jg.layers.Dense(mlp.weights[0], mlp.biases[0], "tanh"),
                                                   jg.layers.LayerNorm(np.ones(6)),
                                                   jg.layers.Dense(mlp.weights[1], mlp.biases[1])])
    x1, x2 = np.random.default_rng(0).standard_normal((8, 3)), np.ones((6, 3))
    want_sym = jg.ntk(net, x1, max_memory=None)
    want = jg.ntk(net, x1, x2, max_memory=None)
    monkeypatch.setattr(ntk_module, "_chunk", lambda net, N, max_memory: 2)  # chunks of 2 rows
    calls = _counted(net, monkeypatch)
    np.testing.assert_allclose(jg.ntk(net, x1), want_sym, rtol=1e-12, atol=1e-14)
    assert len(calls) == 4 + 4 * 3 // 2
    calls.clear()
    np.testing.assert_allclose(jg.ntk(net, x1, x2, trace=True), np.einsum("ijoo->ij", want), rtol=1e-12, atol=1e-14)
    assert len(calls) == 4 + 4 * 3
