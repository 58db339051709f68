"""The forward and backward passes of every network (``Sequential``, and ``MLP``, a Sequential of
Dense layers), written into buffers the caller gives.

One implementation for both callers: ``Sequential.forward`` / ``backward`` carve fresh buffers per call (pooled host blocks, ``_passes.carve(pooled=True)``),
the compiled step (``jacgrad.steps.compiled.TrainingStep``) carves them once and replays. Each layer
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

from ..protocol.passes import Gradients, carve
from ..protocol.layer import layer_leads, lead_shape
from ..algebra.jacobian import LayerJacobian
from ..core.renamed import renamed
from ..cuda.kernels import forward_with_derivative
from .layers import Dense, Residual

__all__ = ["backward_layers", "carve_backward", "carve_forward", "forward_layers", "layer_leads", "lean_outputs",
           "named_grads", "param_views"]


__getattr__ = renamed(__name__, {"BlockGradients": ("jacgrad.Gradients", Gradients)})


def _split(views: list, counts: Sequence[int]) -> list[list]:
    out, at = [], 0
    for n in counts:
        out.append(views[at:at + n])
        at += n
    return out


def lean_outputs(layers: Sequence[Any]) -> list[bool]:
    """Per layer: is it a Dense whose φ' needs ``h`` and whose output only a Dense reads (the next
    layer, or the caller)? Such a layer keeps ``h`` alone; the next Dense recomputes its input
    ``z = φ(h)`` when backward needs it (with ``φ'(h)`` in the same pass), so a forward cache holds
    one ``(B, H)`` array per Dense layer: ``B·Σ H`` elements for a dense stack."""
    K = len(layers)
    return [isinstance(L, Dense) and L._act.df_from_output is None
            and (j == K - 1 or isinstance(layers[j + 1], Dense)) for j, L in enumerate(layers)]


def carve_forward(xp, layers: Sequence[Any], B: int, dtype, zero: bool = False, pooled: bool = False,
                  keep_derivative: bool = False, lean: bool = False) -> list[list]:
    """Per layer, the buffers of ``forward_shapes(B)``: the last layer's kept array in a block of
    its own (an output kept on its own does not keep the states alive), everything else in one.
    ``keep_derivative`` (a compiled step): a Dense layer's ``φ'(h)`` too, where φ' needs ``h``.
    ``lean`` (a forward cache): a ``lean_outputs`` layer gets ``[None, h]`` (its output a fresh
    array the cache does not keep)."""
    leads = layer_leads(layers, B)  # B: the network input's lead; each layer gets its own input's
    thin = lean_outputs(layers) if lean else [False] * len(layers)
    thin = [t and isinstance(b, int) for t, b in zip(thin, leads)]
    shapes = [[L.forward_shapes(b)[1]] if t else L.forward_shapes(b, True) if keep_derivative and isinstance(L, Dense)
              else L.forward_shapes(b) for L, t, b in zip(layers, thin, leads)]
    _, views = carve(xp, [s for sh in shapes[:-1] for s in sh] + shapes[-1][1:], dtype, zero=zero, pooled=pooled)
    _, last = carve(xp, shapes[-1][:1], dtype, zero=zero, pooled=pooled)
    per = _split(views, [len(sh) for sh in shapes[:-1]] + [len(shapes[-1]) - 1])
    per[-1] = last + per[-1]
    return [[None] + p if t else p for p, t in zip(per, thin)]


def carve_backward(xp, layers: Sequence[Any], B: int, dtype, input_grad: bool, grad_y: bool = True,
                   zero: bool = False, pooled: bool = False, in_place: bool = False) -> tuple[Any, list[list]]:
    """``(g, per-layer buffers)``, in one block: per layer the buffers of ``backward_shapes``
    (layer 0 with ``input_grad``, the others always with) and, with ``grad_y``, a ``(B, n_out)``
    buffer ``g`` for a copy of ``∂L/∂y`` (so that no result is the caller's array; else None).
    ``in_place`` (a compiled step): where layer ``j - 1`` is a Dense, layer ``j``'s ``∂L/∂input``
    (its last buffer) IS that Dense's δ buffer — the same view object — and the Dense scales it
    in place (``δ = g ⊙ φ'``: no buffer per cotangent)."""
    leads = layer_leads(layers, B)  # B: the network input's lead; each layer gets its own input's
    shapes = [L.backward_shapes(leads[j], bool(j) or input_grad) for j, L in enumerate(layers)]
    alias = [in_place and j > 0 and isinstance(layers[j - 1], Dense) and isinstance(leads[j], int)
             for j in range(len(layers))]
    shapes = [sh[:-1] if a else sh for sh, a in zip(shapes, alias)]
    head = [lead_shape(leads[-1]) + (layers[-1].n_out,)] if grad_y else []
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
    """``(z_K, states)``: every layer's forward into its buffers. After a lean layer (``carve_forward
    (lean=True)``: its output buffer None) the next Dense's state keeps None for its input."""
    z, states = x, []
    for j, L in enumerate(layers):
        z, st = L.forward(z, check, j, bufs[j])
        if j and bufs[j - 1][0] is None:
            st = (None,) + st[1:]  # z_{j-1} = φ(h_{j-1}): recomputed by backward_layers, not kept
        states.append(st)
    return z, states


def backward_layers(layers: Sequence[Any], states: list, g, grads: list[list], bufs: list[list], input_grad: bool,
                    check: Callable | None = None, factors: list | None = None) -> tuple[Any, list]:
    """``(∂L/∂x or None, deltas)`` from ``g = ∂L/∂y`` (only read): every layer's backward into its
    buffers and its parameter gradients into ``grads[j]``. ``factors``: per Dense layer its
    ``factor(states[j])`` when the caller keeps it (None elsewhere). A Dense whose input was not
    kept (``forward_layers``) gets it back from ``h_{j-1}`` with ``d = φ'(h_{j-1})`` in the same
    pass, and layer ``j - 1`` then scales by that ``d`` (``LayerJacobian(d, W)``)."""
    deltas, d_next = [None] * len(layers), None
    for j in range(len(layers) - 1, -1, -1):
        L, st = layers[j], states[j]
        factor = factors[j] if factors is not None else None
        if d_next is not None:
            factor, d_next = LayerJacobian(d_next, L.W), None
        if isinstance(L, Dense) and st[0] is None:
            z_prev, d_next = forward_with_derivative(states[j - 1][1], layers[j - 1]._act)
            st = (z_prev,) + st[1:]
        if factor is not None:
            g, deltas[j] = L.backward(st, g, grads[j], bool(j) or input_grad, check, j, out=bufs[j], factor=factor)
        else:
            g, deltas[j] = L.backward(st, g, grads[j], bool(j) or input_grad, check, j, out=bufs[j])
    return g, deltas
