"""What a compiled training step reads of its network, and how it hands results back: the layers and
named parameters as they are now (``bound_params``: an ``MLP`` through its lists, a ``Sequential``
through its layers), the parameters' sharing (``ties_of``), and fresh copies of a layer's ``δ``
(``copied``: an array or an attention layer's tuple)."""

from __future__ import annotations

from ..nn.layers import named_params
from ..protocol.sharing import Ties

__all__ = ["LISTS", "bound_params", "copied", "ties_of"]

LISTS = ("weights", "biases", "activations", "xp", "sizes", "dtype")


def bound_params(net) -> tuple:
    """``(layers, [(where, parameter)], activation names or None)`` of ``net`` as it is now: a net
    read through its lists (an ``MLP``, or a duck-typed one, whose Dense layers ``rebind`` makes)
    names ``net.weights[j]`` (None for a missing entry); a ``Sequential`` its layers' parameters."""
    if not hasattr(net, "weights"):
        layers = tuple(net.layers)
        return layers, named_params(layers), None
    ws, bs, names = list(net.weights), list(net.biases), list(net.activations)
    params = [(f"net.{what}[{j}]", lst[j] if j < len(lst) else None)
              for j in range(max(len(ws), len(bs))) for what, lst in (("weights", ws), ("biases", bs))]
    return (tuple(net.layers) if hasattr(net, "layers") else None), params, names


def ties_of(params) -> Ties:
    """The parameters of the uses ``params`` (``protocol.sharing.Ties``; a ``ValueError`` for two
    uses overlapping in memory without being one array or its transpose)."""
    return Ties([(w, p) for w, p in params if p is not None])


def copied(delta):
    """A fresh copy of a layer's ``δ``: an array, None, or a tuple of them (an attention layer's
    cotangents at its q, k, v and output projections)."""
    if isinstance(delta, (tuple, list)):
        return type(delta)(copied(d) for d in delta)
    return None if delta is None else delta.copy()
