"""The layer protocol and its registry: every built-in layer implements ``Layer`` and is
registered under its kind; a new kind registered from outside the package is built by file
loading through the registry; conflicting or incomplete registrations are refused loudly."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.protocol.layer import Layer, layer_class, layer_kinds, register_layer

L = jg.layers


def _layers():
    return [L.Dense(np.ones((3, 4)), None, "tanh"), L.LayerNorm(np.ones(4)), L.RMSNorm(np.ones(4)),
            L.Residual([L.Dense(np.eye(4))])]


def test_every_builtin_layer_is_on_the_protocol_and_registered():
    for layer in _layers():
        assert isinstance(layer, Layer)
        assert layer_class(layer.kind) is type(layer)
        assert layer.spec()["kind"] == layer.kind
        assert set(layer.spec()) == {"kind", *type(layer).spec_fields}
    assert set(layer_kinds()) >= {"dense", "layernorm", "rmsnorm", "residual"}


def test_per_sample_shapes_and_token_buffers():
    dense, norm, rms, res = _layers()
    assert (dense.in_shape, dense.out_shape, res.in_shape) == ((3,), (4,), (4,))
    assert dense.forward_shapes((2, 5)) == [(2, 5, 4)]
    assert norm.forward_shapes((2, 5)) == [(2, 5, 4), (2, 5, 4), (2, 5), (2, 5, 1)]
    assert norm.forward_shapes(2) == [(2, 4), (2, 4), (2,), (2, 1)]


class Gain(L.RMSNorm):
    """A kind defined outside jacgrad (an RMSNorm under another name), for the registry test."""
    kind = "gain_for_a_test"


def test_a_registered_kind_is_saved_and_loaded_through_the_registry(tmp_path):
    register_layer("gain_for_a_test", Gain)
    net = jg.Sequential([L.Dense(np.arange(12.0).reshape(3, 4) / 10), Gain(np.full(4, 2.0), eps=1e-3)])
    path = tmp_path / "net.npz"
    net.save(path)
    back = jg.Sequential.load(path)
    assert type(back.layers[1]) is Gain and back.layers[1].eps == 1e-3
    x = np.ones((2, 3))
    np.testing.assert_array_equal(back(x), net(x))


def test_unknown_kind_and_conflicts_are_refused():
    with pytest.raises(KeyError, match=r"unknown layer kind 'conv9d'; registered: dense, .*residual"):
        layer_class("conv9d")
    with pytest.raises(ValueError, match=r"kind 'dense' is already jacgrad\.(\w+\.)+Dense;"):
        Other = type("Dense2", (L.Dense,), {})
        register_layer("dense", Other)
    with pytest.raises(ValueError, match=r"has kind 'dense', not 'dense_too'"):
        register_layer("dense_too", L.Dense)
    with pytest.raises(TypeError, match=r"missing .*from_spec.*protocol\.layer\.Layer"):
        register_layer("half", type("Half", (), {"kind": "half"}))
    assert layer_class("dense") is L.Dense  # a refused call changes nothing


def test_a_layer_of_no_registered_kind_is_refused_by_sequential():
    class NotALayer:
        n_in = n_out = 3
    with pytest.raises(TypeError, match=r"layer 1 is a NotALayer, not one of Dense, .*register_layer"):
        jg.Sequential([L.Dense(np.ones((3, 3))), NotALayer()])
