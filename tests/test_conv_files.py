"""Save/load of the convolutional family in Sequential's file layout (``netfile.save_layers`` /
``load_layers``): every new layer round-trips its spec, parameters and BatchNorm's running
statistics, in .npz and .safetensors; a misshapen array is refused naming the layer."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.io import netfile
from jacgrad.io.file_safety import NetworkFileError

L = jg.layers


def _layers(dtype=np.float64):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    return [L.Conv2d(r(4, 3, 3, 3), r(4), padding="same", activation="relu"),
            L.BatchNorm2d(r(4), r(4), r(4), rng.uniform(0.5, 2, 4).astype(dtype), eps=1e-3, activation="tanh"),
            L.MaxPool2d(2, padding=1, dilation=(1, 2)),
            L.Conv2d(r(6, 2, 2, 3), None, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
            L.AvgPool2d(2, 1),
            L.AdaptiveAvgPool2d(1),
            L.Flatten(),
            L.Dense(r(6, 3), r(3), "sigmoid")]


def _forward(layers, x):
    for layer in layers:
        x = layer.forward(x)[0]
    return x


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_every_new_layer_round_trips(tmp_path, suffix):
    layers = _layers()
    path = tmp_path / f"cnn{suffix}"
    netfile.save_layers(layers, path)
    back = netfile.load_layers(path)
    assert [b.spec() for b in back] == [a.spec() for a in layers]
    assert [type(b) for b in back] == [type(a) for a in layers]
    for a, b in zip(layers, back):
        for p, q in zip(a.params, b.params):
            np.testing.assert_array_equal(p, q)
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 16))
    np.testing.assert_array_equal(_forward(back, x), _forward(layers, x))
    c1 = [L.Conv1d(np.ones((2, 3, 2)), np.zeros(2), stride=2, padding="valid"), L.BatchNorm1d(None, None, np.zeros(2),
                                                                                         np.ones(2))]
    netfile.save_layers(c1, tmp_path / f"c1{suffix}")
    back = netfile.load_layers(tmp_path / f"c1{suffix}")
    assert [b.spec() for b in back] == [a.spec() for a in c1]
    np.testing.assert_array_equal(back[1].running_var, np.ones(2))


def test_a_misshapen_array_is_refused_naming_the_layer(tmp_path):
    path = tmp_path / "bad.npz"
    layers = _layers()
    netfile.save_layers(layers, path)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["1.running_var"] = np.ones(5)
    np.savez(path, **arrays)
    with pytest.raises(NetworkFileError, match=r"layer 1 \(batchnorm2d\): '?1.running_var'? has shape \(5,\); it must be \(4,\)"):
        netfile.load_layers(path)
    arrays["1.running_var"] = np.ones(4)
    arrays["0.weight"] = np.ones((4, 27))
    np.savez(path, **arrays)
    with pytest.raises(NetworkFileError, match=r"layer 0 \(conv2d\): .*must be 4-D"):
        netfile.load_layers(path)
