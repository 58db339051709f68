"""The forward and backward passes of a ``Sequential``, written into buffers the caller gives.

One implementation for both callers, as ``_passes`` is for ``MLP``: ``Sequential.forward`` /
``backward`` carve fresh buffers per call (pooled host blocks, ``_passes.carve(pooled=True)``),
the compiled step (``jacgrad.compiled.TrainingStep``) carves them once and replays. Each layer
names the buffers it writes (``forward_shapes(B)``: its output first; ``backward_shapes(B,
input_grad)``), and its ``forward``/``backward`` take them as ``out=``; the passes here hand
every layer its slice, in layer order::

    forward    z_j, state_j = layer_j.forward(z_{j-1}, out=fbufs[j])
    backward   g_{j-1}, δ_j = layer_j.backward(state_j, g_j, grads_j, out=bbufs[j])

A layer only reads the cotangent ``g_j`` it is given, so the buffers never alias each other's
live contents. Parameters are read from the layers when the pass runs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ._passes import Gradients, carve
from .layer_protocol import lead_shape
from .layers import Dense, Residual

__all__ = ["BlockGradients", "backward_layers", "carve_backward", "carve_forward", "forward_layers", "named_grads",
           "param_views"]


BlockGradients = Gradients  # the old name of the one gradient type


def _split(views: list, counts: Sequence[int]) -> list[list]:
    out, at = [], 0
    for n in counts:
        out.append(views[at:at + n])
        at += n
    return out


def carve_forward(xp, layers: Sequence[Any], B: int, dtype, zero: bool = False, pooled: bool = False,
                  keep_derivative: bool = False) -> list[list]:
    """Per layer, the buffers of ``forward_shapes(B)``: the last layer's output in a block of its
    own (an output kept on its own does not keep the states alive), everything else in one.
    ``keep_derivative`` (a compiled step): a Dense layer's ``φ'(h)`` too, where φ' needs ``h``."""
    shapes = [L.forward_shapes(B, True) if keep_derivative and isinstance(L, Dense) else L.forward_shapes(B)
              for L in layers]
    _, views = carve(xp, [s for sh in shapes[:-1] for s in sh] + shapes[-1][1:], dtype, zero=zero, pooled=pooled)
    _, last = carve(xp, shapes[-1][:1], dtype, zero=zero, pooled=pooled)
    per = _split(views, [len(sh) for sh in shapes[:-1]] + [len(shapes[-1]) - 1])
    per[-1] = last + per[-1]
    return per


def carve_backward(xp, layers: Sequence[Any], B: int, dtype, input_grad: bool, grad_y: bool = True,
                   zero: bool = False, pooled: bool = False, in_place: bool = False) -> tuple[Any, list[list]]:
    """``(g, per-layer buffers)``, in one block: per layer the buffers of ``backward_shapes``
    (layer 0 with ``input_grad``, the others always with) and, with ``grad_y``, a ``(B, n_out)``
    buffer ``g`` for a copy of ``∂L/∂y`` (so that no result is the caller's array; else None).
    ``in_place`` (a compiled step): where layer ``j - 1`` is a Dense, layer ``j``'s ``∂L/∂input``
    (its last buffer) IS that Dense's δ buffer — the same view object — and the Dense scales it
    in place (``δ = g ⊙ φ'``: no buffer per cotangent)."""
    shapes = [L.backward_shapes(B, bool(j) or input_grad) for j, L in enumerate(layers)]
    alias = [in_place and j > 0 and isinstance(layers[j - 1], Dense) for j in range(len(layers))]
    shapes = [sh[:-1] if a else sh for sh, a in zip(shapes, alias)]
    head = [lead_shape(B) + (layers[-1].n_out,)] if grad_y else []
    _, views = carve(xp, head + [s for sh in shapes for s in sh], dtype, zero=zero, pooled=pooled)
    per = _split(views[len(head):], [len(sh) for sh in shapes])
    for j, a in enumerate(alias):
        if a:
            per[j].append(per[j - 1][0])
    return (views[0] if grad_y else None), per


def param_views(layers: Sequence[Any], views: list) -> list[list]:
    """``views`` (one per parameter, in layer order) split per layer."""
    return _split(views, [len(L.params) for L in layers])


def _named(layer, views: list):
    """Layer gradients by name, from its views (a Residual: a list of its inner layers')."""
    if isinstance(layer, Residual):
        out, at = [], 0
        for L in layer.layers:
            n = len(L.params)
            out.append(_named(L, views[at:at + n]))
            at += n
        return out
    return dict(zip(layer.names, views))


def named_grads(layers: Sequence[Any], per_layer: list[list]) -> list:
    """Per layer, its gradients by name (``BlockGradients.layers``) from its views."""
    return [_named(L, v) for L, v in zip(layers, per_layer)]


def forward_layers(layers: Sequence[Any], x, bufs: list[list], check: Callable | None = None) -> tuple[Any, list]:
    """``(z_K, states)``: every layer's forward into its buffers."""
    z, states = x, []
    for j, L in enumerate(layers):
        z, st = L.forward(z, check, j, bufs[j])
        states.append(st)
    return z, states


def backward_layers(layers: Sequence[Any], states: list, g, grads: list[list], bufs: list[list], input_grad: bool,
                    check: Callable | None = None, factors: list | None = None) -> tuple[Any, list]:
    """``(∂L/∂x or None, deltas)`` from ``g = ∂L/∂y`` (only read): every layer's backward into its
    buffers and its parameter gradients into ``grads[j]``. ``factors``: per Dense layer its
    ``factor(states[j])`` when the caller keeps it (None elsewhere)."""
    deltas = [None] * len(layers)
    for j in range(len(layers) - 1, -1, -1):
        if factors is not None and factors[j] is not None:
            g, deltas[j] = layers[j].backward(states[j], g, grads[j], bool(j) or input_grad, check, j, out=bufs[j],
                                              factor=factors[j])
        else:
            g, deltas[j] = layers[j].backward(states[j], g, grads[j], bool(j) or input_grad, check, j, out=bufs[j])
    return g, deltas
