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

import math
from typing import Any, Callable, Sequence

from ..protocol.passes import Gradients, block
from ..core.backend import get_xp
from ..protocol.layer import anchor, layer_leads, layout_generation, lead_shape
from ..core.renamed import renamed

__all__ = ["Plan", "Plans", "backward_layers", "carve_backward", "carve_grads", "carve_forward", "forward_layers", "layer_leads", "lean_outputs",
           "named_grads", "param_views"]


__getattr__ = renamed(__name__, {"BlockGradients": ("jacgrad.Gradients", Gradients)})


def _split(views: list, counts: Sequence[int]) -> list[list]:
    out, at = [], 0
    for n in counts:
        out.append(views[at:at + n])
        at += n
    return out


def lean_outputs(layers: Sequence[Any]) -> list[bool]:
    """Per layer: can it recompute its output from its state (``output_recomputable``: a Dense
    whose φ' needs ``h``), and does only a layer that takes its input back recomputed
    (``input_in_state``) read that output (the next layer, or the caller)? Such a layer keeps its
    state alone; the next layer's backward recomputes its input (``recompute_output``, with the
    factor in the same pass), so a dense stack's forward cache holds one ``(B, H)`` array per layer."""
    K = len(layers)
    return [getattr(L, "output_recomputable", False)
            and (j == K - 1 or getattr(layers[j + 1], "input_in_state", False)) for j, L in enumerate(layers)]


class Plan:
    """What the passes of one layer stack read at one input lead ``B`` (an int, or ``(B, T)``),
    worked out once: each layer's input lead (``layers``' ``output_lead``), its forward and backward
    callables (a layer's ``passes_for(lead)`` where it has one: a per-token layer's row passes on
    ``(B, n)``, no dispatch on the token axis), which layers take their input back recomputed, and
    the buffer layouts of ``carve_forward``/``carve_backward`` by their flags. It depends only on
    the layers (their shapes, activations) and ``B``: a ``Sequential`` keeps one per lead until its
    layers change (``protocol.layer.layout_changed``)."""

    __slots__ = ("leads", "forwards", "backwards", "recompute", "counts", "names", "layouts")

    def __init__(self, layers: Sequence[Any], B: Any):
        self.leads = layer_leads(layers, B)
        passes = [L.passes_for(b) if hasattr(L, "passes_for") else (L.forward, L.backward)
                  for L, b in zip(layers, self.leads)]
        self.forwards, self.backwards = [f for f, _ in passes], [b for _, b in passes]
        self.recompute = [bool(j) and getattr(L, "input_in_state", False) for j, L in enumerate(layers)]
        self.counts = [len(L.params) for L in layers]
        self.names = [None if hasattr(L, "layers") else L.names for L in layers]  # None: a container
        self.layouts: dict = {}


class Plans:
    """A network's ``Plan`` per input lead and what its passes read of its layers (``dtype``, ``xp``,
    ``in_shape``, ``takes_tokens``), worked out once for ``layers`` at the current
    ``layout_generation()`` (stale at another: a layer changed in place); a few leads at a time."""

    __slots__ = ("layers", "generation", "dtype", "xp", "in_shape", "takes_tokens", "_by_lead")

    def __init__(self, layers: Sequence[Any]):
        a = anchor(layers)
        self.layers, self.generation, self.dtype, self.xp = layers, layout_generation(), a.dtype, get_xp(a)
        self.in_shape = tuple(layers[0].in_shape)
        self.takes_tokens = all(getattr(L, "per_token", False) for L in layers)
        self._by_lead: dict = {}

    def at(self, lead: Any) -> Plan:
        """The ``Plan`` at input lead ``lead`` (an int ``B`` or ``(B, T)``)."""
        plan = self._by_lead.get(lead)
        if plan is None:
            if len(self._by_lead) >= 8:
                self._by_lead.clear()
            plan = self._by_lead[lead] = Plan(self.layers, lead)
        return plan


def _plan(layers: Sequence[Any], B: Any, plan: Plan | None) -> Plan:
    return plan if plan is not None else Plan(layers, B)


def _spans(shapes: Sequence[tuple]) -> tuple[int, list]:
    """``(n, [(start, stop, shape)])``: consecutive pieces of a 1-D block of ``n`` elements."""
    spans, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        spans.append((at, at + n, shape))
        at += n
    return at, spans


def _carve(xp, n: int, spans: list, dtype, zero: bool, pooled: bool) -> tuple[Any, list]:
    """``carve`` of a layout worked out before (``_spans``): the block and its views."""
    flat = block(xp, n, dtype, zero, pooled)
    return flat, [flat[a:b].reshape(shape) for a, b, shape in spans]


def carve_forward(xp, layers: Sequence[Any], B: int, dtype, zero: bool = False, pooled: bool = False,
                  keep_derivative: bool = False, lean: bool = False, plan: Plan | None = None) -> list[list]:
    """Per layer, the buffers of ``forward_shapes(B)``: the last layer's kept array in a block of
    its own (an output kept on its own does not keep the states alive), everything else in one.
    ``keep_derivative`` (a compiled step): an ``output_recomputable`` layer's derivative too (a
    Dense's ``φ'(h)``, where φ' needs ``h``).
    ``lean`` (a forward cache): a ``lean_outputs`` layer gets ``[None, h]`` (its output a fresh
    array the cache does not keep). ``plan``: this stack's ``Plan`` at ``B`` (the layout is kept in it)."""
    plan = _plan(layers, B, plan)
    key = ("forward", keep_derivative, lean)
    layout = plan.layouts.get(key)
    if layout is None:
        layout = plan.layouts[key] = _forward_layout(layers, plan.leads, keep_derivative, lean)
    (n, spans), (n_last, last_span), counts, thin = layout
    _, views = _carve(xp, n, spans, dtype, zero, pooled)
    _, last = _carve(xp, n_last, last_span, dtype, zero, pooled)
    per = _split(views, counts)
    per[-1] = last + per[-1]
    return [[None] + p if t else p for p, t in zip(per, thin)]


def _forward_layout(layers: Sequence[Any], leads: list, keep_derivative: bool, lean: bool) -> tuple:
    thin = lean_outputs(layers) if lean else [False] * len(layers)
    thin = [t and isinstance(b, int) for t, b in zip(thin, leads)]
    shapes = [[L.forward_shapes(b)[1]] if t else L.forward_shapes(b, True)
              if keep_derivative and getattr(L, "output_recomputable", False) else L.forward_shapes(b)
              for L, t, b in zip(layers, thin, leads)]
    counts = [len(sh) for sh in shapes[:-1]] + [len(shapes[-1]) - 1]
    return _spans([s for sh in shapes[:-1] for s in sh] + shapes[-1][1:]), _spans(shapes[-1][:1]), counts, thin


def carve_backward(xp, layers: Sequence[Any], B: int, dtype, input_grad: bool, grad_y: bool = True,
                   zero: bool = False, pooled: bool = False, in_place: bool = False,
                   plan: Plan | None = None) -> tuple[Any, list[list]]:
    """``(g, per-layer buffers)``, in one block: per layer the buffers of ``backward_shapes``
    (layer 0 with ``input_grad``, the others always with) and, with ``grad_y``, a ``(B, n_out)``
    buffer ``g`` for a copy of ``∂L/∂y`` (so that no result is the caller's array; else None).
    ``in_place`` (a compiled step): where layer ``j - 1`` ``scales_in_place`` (a Dense), layer ``j``'s
    ``∂L/∂input`` (its last buffer) IS that layer's δ buffer — the same view object — and it scales
    it in place (``δ = g ⊙ φ'``: no buffer per cotangent). ``plan``: as for ``carve_forward``."""
    plan = _plan(layers, B, plan)
    key = ("backward", input_grad, grad_y, in_place)
    layout = plan.layouts.get(key)
    if layout is None:
        layout = plan.layouts[key] = _backward_layout(layers, plan.leads, input_grad, grad_y, in_place)
    (n, spans), head, counts, alias = layout
    _, views = _carve(xp, n, spans, dtype, zero, pooled)
    per = _split(views[head:], counts)
    for j in alias:
        per[j].append(per[j - 1][0])
    return (views[0] if head else None), per


def _backward_layout(layers: Sequence[Any], leads: list, input_grad: bool, grad_y: bool, in_place: bool) -> tuple:
    shapes = [L.backward_shapes(leads[j], bool(j) or input_grad) for j, L in enumerate(layers)]
    alias = [in_place and j > 0 and getattr(layers[j - 1], "scales_in_place", False) and isinstance(leads[j], int)
             for j in range(len(layers))]
    shapes = [sh[:-1] if a else sh for sh, a in zip(shapes, alias)]
    head = [lead_shape(leads[-1]) + (layers[-1].n_out,)] if grad_y else []
    return (_spans(head + [s for sh in shapes for s in sh]), len(head), [len(sh) for sh in shapes],
            [j for j, a in enumerate(alias) if a])


def carve_grads(xp, ties, dtype, plan: Plan) -> tuple[Any, list]:
    """``carve(xp, ties.use_shapes, dtype, pooled=True)``: a pooled block for every use's gradient
    (``protocol.sharing.Ties``) and its views, the layout kept in ``plan`` while ``ties`` is the same."""
    layout = plan.layouts.get("grads")
    if layout is None or layout[0] is not ties:
        layout = plan.layouts["grads"] = (ties,) + _spans(ties.use_shapes)
    return _carve(xp, layout[1], layout[2], dtype, False, True)


def param_views(layers: Sequence[Any], views: list, plan: Plan | None = None) -> list[list]:
    """``views`` (one per parameter, in layer order) split per layer."""
    return _split(views, plan.counts if plan is not None else [len(L.params) for L in layers])


def _named(layer, views: list):
    """Layer gradients by name, from its views (a container, a Residual: a list of its inner layers')."""
    inner = getattr(layer, "layers", None)
    if inner is not None:
        out, at = [], 0
        for L in inner:
            n = len(L.params)
            out.append(_named(L, views[at:at + n]))
            at += n
        return out
    return dict(zip(layer.names, views))


def named_grads(layers: Sequence[Any], per_layer: list[list], plan: Plan | None = None) -> list:
    """Per layer, its gradients by name (``BlockGradients.layers``) from its views."""
    if plan is None:
        return [_named(L, v) for L, v in zip(layers, per_layer)]
    return [_named(L, v) if n is None else dict(zip(n, v)) for L, v, n in zip(layers, per_layer, plan.names)]


def forward_layers(layers: Sequence[Any], x, bufs: list[list], check: Callable | None = None,
                   plan: Plan | None = None) -> tuple[Any, list]:
    """``(z_K, states)``: every layer's forward into its buffers (through ``plan``'s callables when
    given). After a lean layer (``carve_forward(lean=True)``: its output buffer None) the next
    layer's state keeps None for its input."""
    z, states = x, []
    forwards = plan.forwards if plan is not None else [L.forward for L in layers]
    for j, f in enumerate(forwards):
        z, st = f(z, check, j, bufs[j])
        if j and bufs[j - 1][0] is None:
            st = (None,) + st[1:]  # z_{j-1} = φ(h_{j-1}): recomputed by backward_layers, not kept
        states.append(st)
    return z, states


def backward_layers(layers: Sequence[Any], states: list, g, grads: list[list], bufs: list[list], input_grad: bool,
                    check: Callable | None = None, factors: list | None = None,
                    plan: Plan | None = None) -> tuple[Any, list]:
    """``(∂L/∂x or None, deltas)`` from ``g = ∂L/∂y`` (only read): every layer's backward into its
    buffers and its parameter gradients into ``grads[j]`` (through ``plan``'s callables when given).
    ``factors``: per layer its ``factor(states[j])`` when the caller keeps it (None elsewhere). A
    layer whose input was not kept (``forward_layers``) gets it back from layer ``j - 1``'s
    ``recompute_output``, whose factor, made in the same pass, layer ``j - 1`` then takes (a Dense:
    ``LayerJacobian(φ'(h), W)``)."""
    if plan is not None:
        backwards, recompute = plan.backwards, plan.recompute
    else:
        backwards = [L.backward for L in layers]
        recompute = [bool(j) and getattr(L, "input_in_state", False) for j, L in enumerate(layers)]
    deltas, recomputed = [None] * len(layers), None
    for j in range(len(layers) - 1, -1, -1):
        st = states[j]
        factor = factors[j] if factors is not None else None
        if recomputed is not None:
            factor, recomputed = recomputed, None
        if recompute[j] and st[0] is None:
            z_prev, recomputed = layers[j - 1].recompute_output(states[j - 1])
            st = (z_prev,) + st[1:]
        if factor is not None:
            g, deltas[j] = backwards[j](st, g, grads[j], bool(j) or input_grad, check, j, out=bufs[j], factor=factor)
        else:
            g, deltas[j] = backwards[j](st, g, grads[j], bool(j) or input_grad, check, j, out=bufs[j])
    return g, deltas
