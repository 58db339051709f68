"""jacgrad.core.lazy: the networks hand chunked arrays to the handler registered for their type."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.core import lazy as _lazy


class _Chunked:
    """Stands in for a lazy array type of another library."""

    shape, dtype, ndim = (4, 3), np.dtype(np.float64), 2


_Chunked.__module__ = "fakechunks.core"


@pytest.fixture
def registered(monkeypatch):
    calls = []
    monkeypatch.setattr(_lazy, "_HANDLERS", dict(_lazy._HANDLERS))
    _lazy.register("fakechunks", lambda name, net, x, *a, **k: calls.append((name, net, x)) or "lazy result")
    return calls


def test_net_call_hands_a_registered_array_type_to_its_handler(registered):
    net = jg.MLP.init([3, 2], seed=0)
    x = _Chunked()
    assert net(x) == "lazy result"
    assert registered == [("__call__", net, x)]
    with pytest.raises(TypeError, match="forward takes an in-memory batch, not a fakechunks.core array"):
        net.forward(x)


def test_other_types_are_not_handed_over(registered):
    assert _lazy.handler_for(np.ones(2)) is None
    assert _lazy.handler_for(None) is None
    assert _lazy.handler_for([1.0, 2.0]) is None
    assert _lazy.handler_for(_Chunked()) is not None
    net = jg.MLP.init([3, 2], seed=0)
    np.testing.assert_array_equal(net(np.ones((1, 3))), net.forward(np.ones((1, 3)))[0])
    assert registered == []
