"""``Residual``: the block ``z + s·f(z)`` around inner layers, on ``(B, H)`` or ``(B, T, H)``.

A container layer: it exposes its inner layers as ``layers``, its leaves are theirs in order, and
its factor is a ``ResidualFactor`` (``I + s·J_inner``) whose ``inner`` chain the parameter-space
sweeps open.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.backend import get_xp
from ..algebra.chain import Chain
from ..algebra.factors import ResidualFactor
from ..protocol.layer import buffers as _buffers, chained, layer_leads, lead_shape, register_layer

__all__ = ["Residual"]


class Residual:
    """``z + s·f(z)`` with ``f`` the inner ``layers`` in order, each mapping ``H -> H`` overall
    (``n_in`` of the first = ``n_out`` of the last, consecutive widths agreeing). Keeps for
    backward: the inner layers' states (nothing of its own). Jacobian ``I + s·J_f``."""

    kind = "residual"
    names = ()
    spec_fields = {"scale": (int, float), "layers": list}
    per_token = True

    def __init__(self, layers: Sequence[Any], scale: float = 1.0):
        layers = chained(layers, "Residual: ", "inner layer")
        if layers[0].n_in != layers[-1].n_out:
            raise ValueError(f"Residual: the inner layers map {layers[0].n_in} -> {layers[-1].n_out} features; a "
                             f"residual block needs H -> H (inner layer {len(layers) - 1} must output {layers[0].n_in})")
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"Residual: scale must be finite, got {scale!r}")
        self._layers, self._scale = tuple(layers), scale

    layers = property(lambda self: self._layers, doc="the inner layers (a tuple)")
    scale = property(lambda self: self._scale, doc="the branch scale s")
    n_in = n_out = property(lambda self: self._layers[0].n_in)
    in_shape = property(lambda self: self._layers[0].in_shape, doc="per sample, without B")
    out_shape = property(lambda self: self._layers[-1].out_shape, doc="per sample, without B")

    @property
    def params(self) -> list:
        return [p for L in self._layers for p in L.params]

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "layers": [L.spec() for L in self._layers]}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Residual":
        """The block of a file's ``spec`` (``scale``) around its built ``inner`` layers."""
        return cls(inner, spec["scale"])

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        raise ValueError(f"layer {where}: a residual block's widths are its inner layers'")

    def param_leaves(self) -> list:
        """Its inner layers' leaves, in order (a container adds none of its own)."""
        return [leaf for L in self._layers for leaf in L.param_leaves()]

    def __repr__(self) -> str:
        return f"Residual([{', '.join(map(repr, self._layers))}], scale={self.scale:g})"

    def forward_shapes(self, B: Any) -> list:
        """Shapes of the buffers ``forward`` writes: the output ``(B, H)``, then the inner layers'
        (``B``: an int, or ``(B, T)`` for a token batch)."""
        leads = layer_leads(self._layers, B)
        return [lead_shape(B) + (self.n_in,)] + [s for L, b in zip(self._layers, leads) for s in L.forward_shapes(b)]

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: ``s·g``, the inner layers', and ``∂L/∂z``."""
        inner = [s for L, b in zip(self._layers, layer_leads(self._layers, B)) for s in L.backward_shapes(b, True)]
        lead = lead_shape(B)
        return [lead + (self.n_in,)] + inner + ([lead + (self.n_in,)] if input_grad else [])

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, H) -> z + s·f(z)`` (or per token ``(B, T, H)``); returns ``(out, inner states)``;
        ``out``: the buffers of ``forward_shapes``."""
        name = where if isinstance(where, str) else f"layer {where}"
        B = z.shape[0] if z.ndim == 2 else tuple(z.shape[:-1])
        bufs = _buffers(out, self.forward_shapes(B), z)
        u, states, at = z, [], 1
        leads = layer_leads(self._layers, B)
        for i, L in enumerate(self._layers):
            n = len(L.forward_shapes(leads[i]))
            u, st = L.forward(u, check, f"{name}.{i}", bufs[at:at + n])
            states.append(st)
            at += n
        xp = get_xp(z)
        su = u if self.scale == 1.0 else xp.multiply(u, self.scale, out=bufs[0])  # 1·u is u: skip the pass
        return xp.add(z, su, out=bufs[0]), states

    def factor(self, state) -> ResidualFactor:
        return ResidualFactor(Chain([L.factor(st) for L, st in zip(self._layers, state)]), self.scale)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """Inner backward of ``s·g``; returns ``(g + its input gradient, g)``; ``g`` is only read;
        ``out``: the buffers of ``backward_shapes``; ``sq`` as the inner layers'."""
        name = where if isinstance(where, str) else f"layer {where}"
        B, xp = (g.shape[0] if g.ndim == 2 else tuple(g.shape[:-1])), get_xp(g)
        bufs = _buffers(out, self.backward_shapes(B, input_grad), g)
        at, cut = [0], [1]
        for L, b in zip(self._layers, layer_leads(self._layers, B)):
            at.append(at[-1] + len(L.params))
            cut.append(cut[-1] + len(L.backward_shapes(b, True)))
        u = g if self.scale == 1.0 else xp.multiply(g, self.scale, out=bufs[0])  # the inner layers only read it
        for i in range(len(self._layers) - 1, -1, -1):
            u, _ = self._layers[i].backward(state[i], u, grads[at[i]:at[i + 1]], True, check, f"{name}.{i}", sq,
                                            bufs[cut[i]:cut[i + 1]])
        return (xp.add(g, u, out=bufs[-1]) if input_grad else None), g


register_layer("residual", Residual)
