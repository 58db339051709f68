"""A network's parameter leaves (``jacgrad.protocol.leaves``) in parameter order — the order of
``Gradients.flat`` — with the ``a`` each pairs with ``δ`` and its views of a parameter block:
what the products (``params.param_space``) and the compiled steps read of a layer stack.
"""

from __future__ import annotations

from ..algebra import per_sample
from ..nn.layers import leaf_layers
from ..nn.stack import named_grads, param_views
from .shared import SharedGroup

__all__ = ["by_name", "leaf_inputs", "leaf_views", "leaves_of", "named_views", "shared_group"]


def leaves_of(layers) -> list:
    """``[(top-level index, layer, leaf)]``: every parameter leaf (``layer.param_leaves()``),
    containers opened, in parameter order."""
    return [(path[0], L, leaf) for path, L in leaf_layers(layers) for leaf in L.param_leaves()]


def _leaf_states(layers, states) -> list:
    """The forward states of the non-container layers, in ``leaf_layers`` order."""
    out = []
    for L, st in zip(layers, states):
        inner = getattr(L, "layers", None)
        out += _leaf_states(inner, st) if inner is not None else [st]
    return out


def leaf_inputs(layers, states) -> list:
    """``[(leaf, a)]``: every leaf and the ``a`` it pairs with ``δ`` (``L.param_input`` of its
    forward state: ``z_prev`` of a Dense, ``x̂`` of a norm layer, ``(B, p)`` or ``(B, T, p)``; a
    layer with several leaves gives a list), in parameter order; ``states``: ``forward_layers``'."""
    out = []
    for (_, L), st in zip(leaf_layers(layers), _leaf_states(layers, states)):
        leaves = L.param_leaves()
        if leaves:
            a = L.param_input(st)
            out += list(zip(leaves, a if len(leaves) > 1 else [a]))
    return out


def leaf_views(layers, flat, ties=None) -> list:
    """Per leaf, the list of views of ``flat: (…, P)`` in its parameters' shapes. ``ties`` (the
    layers' ``protocol.sharing.Ties``, where a parameter may be shared): ``flat`` is laid out by
    parameter, and a shared parameter's view is in every leaf that uses it (transposed where the
    use is)."""
    leaves = leaves_of(layers)
    if ties is not None and ties.shared:
        views = ties.use_views(ties.param_views(flat))
    else:
        views = per_sample.param_views(flat, [tuple(p.shape) for _, L in leaf_layers(layers) for p in L.params])
    out, at = [], 0
    for _, _, leaf in leaves:
        out.append(views[at:at + leaf.n_arrays])
        at += leaf.n_arrays
    return out


def named_views(layers, flat) -> list:
    """``Gradients.layers`` of a parameter block ``flat: (…, P)``: per layer, its views by name."""
    return by_name(layers, leaf_views(layers, flat))


def by_name(layers, leaf_views: list) -> list:
    """``leaf_views`` (one list per leaf) grouped as ``Gradients.layers``: names per layer."""
    return named_grads(layers, param_views(layers, [v for leaf in leaf_views for v in leaf]))


def shared_group(layers, ties):
    """The leaves of ``layers`` holding a parameter shared under ``ties`` (``params.shared.SharedGroup``),
    or None where no parameter is shared: every product then runs its leaves' own rules."""
    if not ties.shared:
        return None
    leaves = leaves_of(layers)
    owners = [j for j, _, leaf in leaves for _ in range(leaf.n_arrays)]
    return SharedGroup(ties, [leaf.n_arrays for _, _, leaf in leaves], owners)
