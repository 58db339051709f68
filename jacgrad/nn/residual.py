"""``Residual``: the block ``y = z + s·f(z)``, or with a projection shortcut ``y = p(z) + s·f(z)``,
around inner layers, on ``(B, H)``, ``(B, T, H)`` or images ``(B, C, H, W)`` (a ResNet block).

A container layer: it exposes its inner layers as ``layers`` — the branch ``f`` then the shortcut
``p`` (``branch``, ``shortcut``) — its leaves are theirs in that order, and its factor is a
``ResidualFactor`` (``J_p + s·J_f``; ``I + s·J_f`` without a shortcut) whose ``inner`` and
``shortcut`` chains the parameter-space sweeps open.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers
    >>> block = L.Residual([L.Conv2d(np.ones((4, 2, 3, 3)) / 9, None, stride=2, padding=1, activation="relu")],
    ...                    shortcut=[L.Conv2d(np.ones((4, 2, 1, 1)), None, stride=2)])
    >>> block.bind_in_shape((2, 6, 6)), block.forward(np.ones((1, 2, 6, 6)))[0].shape
    ((4, 3, 3), (1, 4, 3, 3))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.backend import get_xp
from ..algebra.chain import Chain
from ..algebra.residual_factor import ResidualFactor
from ..protocol.layer import bind_shapes, buffers as _buffers, chained, layer_leads, lead_shape, register_layer

__all__ = ["Residual"]


def _shape(L, which: str):
    s = getattr(L, which, None)
    return None if s is None or None in tuple(s) else tuple(s)


def _say(shape, n):
    """A per-sample shape as the messages give it: ``4`` for ``(4,)``, else the tuple (or the width ``n``)."""
    return n if shape is None else shape[0] if len(shape) == 1 else shape


class Residual:
    """``z + s·f(z)`` with ``f`` the inner ``layers`` in order, mapping the input's shape to itself;
    or, with ``shortcut`` (a list of layers ``p``, e.g. a strided 1×1 ``Conv2d`` and a ``BatchNorm2d``),
    ``p(z) + s·f(z)``, ``p`` and ``f`` mapping the same input shape to the same output shape
    (``(C, H, W) -> (C', H', W')`` per sample). Keeps for backward: the inner layers' states
    (branch, then shortcut). Jacobian ``I + s·J_f`` or ``J_p + s·J_f``."""

    kind = "residual"
    names = ()
    spec_fields = {"scale": (int, float), "layers": list}
    spec_optional = {"shortcut": list}  # absent in files of a block without one (older files too)

    def __init__(self, layers: Sequence[Any], scale: float = 1.0, shortcut: Sequence[Any] | None = None):
        layers = chained(layers, "Residual: ", "inner layer")
        if shortcut is not None:
            shortcut = chained(shortcut, "Residual: ", "shortcut layer")
        scale = float(scale)
        if not np.isfinite(scale):
            raise ValueError(f"Residual: scale must be finite, got {scale!r}")
        self._branch, self._shortcut, self._scale = tuple(layers), None if shortcut is None else tuple(shortcut), scale
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The branch (and shortcut) map the block's input shape to one output shape (where known)."""
        f0, f1 = _shape(self._branch[0], "in_shape"), _shape(self._branch[-1], "out_shape")
        if self._shortcut is None:
            n0, n1 = self._branch[0].n_in, self._branch[-1].n_out
            if (f0 is not None and f1 is not None and f0 != f1) or (None not in (n0, n1) and n0 != n1):
                a, b = _say(f0, n0), _say(f1, n1)
                raise ValueError(f"Residual: the inner layers map {a} -> {b}; a residual block without a shortcut needs "
                                 f"the same shape out as in (inner layer {len(self._branch) - 1} must output {a}); give "
                                 f"shortcut=[...] layers that map the input to {b}")
            return
        p0, p1 = _shape(self._shortcut[0], "in_shape"), _shape(self._shortcut[-1], "out_shape")
        for what, a, b in (("take", f0, p0), ("output", f1, p1)):
            if a is not None and b is not None and a != b:
                raise ValueError(f"Residual: the inner layers {what} {a} per sample but the shortcut layers {b}: "
                                 f"both must map the block's input to the same shape")

    layers = property(lambda self: self._branch + (self._shortcut or ()),
                      doc="every inner layer, in parameter order: the branch's, then the shortcut's (a tuple)")
    branch = property(lambda self: self._branch, doc="the branch f (a tuple of layers)")
    shortcut = property(lambda self: self._shortcut, doc="the shortcut p (a tuple of layers), or None: the identity")
    scale = property(lambda self: self._scale, doc="the branch scale s")
    n_in = property(lambda self: self._branch[0].n_in)
    n_out = property(lambda self: self._branch[-1].n_out)
    in_shape = property(lambda self: self._branch[0].in_shape, doc="per sample, without B")
    out_shape = property(lambda self: self._branch[-1].out_shape, doc="per sample, without B")
    per_token = property(lambda self: all(getattr(L, "per_token", False) for L in self.layers),
                         doc="True when every inner layer acts per token (then (B, T, H) batches go through)")

    @property
    def params(self) -> list:
        return [p for L in self.layers for p in L.params]

    def bind_in_shape(self, in_shape) -> tuple:
        """Give the inner image layers their per-sample input shapes (``Sequential`` passes the
        block its predecessor's output shape); returns ``out_shape``. A shape not known yet (a
        width-less ``Activation`` before it) binds nothing."""
        if in_shape is None or None in tuple(in_shape):
            return self.out_shape
        for name, part in (("inner", self._branch), ("shortcut", self._shortcut or ())):
            try:
                bind_shapes(part, in_shape, f"Residual ({name} layers)")
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        self._check_shapes()
        return tuple(self.out_shape)

    def spec(self) -> dict:
        out = {"kind": self.kind, "scale": self.scale, "layers": [L.spec() for L in self._branch]}
        if self._shortcut is not None:
            out["shortcut"] = [L.spec() for L in self._shortcut]
        return out

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Residual":
        """The block of a file's ``spec`` (``scale``, and ``shortcut`` where it has one) around its
        built ``inner`` layers (the branch's, then the shortcut's)."""
        n = len(spec["layers"])
        return cls(inner[:n], spec["scale"], inner[n:] if "shortcut" in spec else None)

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        raise ValueError(f"layer {where}: a residual block's widths are its inner layers'")

    def param_leaves(self) -> list:
        """Its inner layers' leaves, in order (a container adds none of its own)."""
        return [leaf for L in self.layers for leaf in L.param_leaves()]

    def __repr__(self) -> str:
        short = "" if self._shortcut is None else f", shortcut=[{', '.join(map(repr, self._shortcut))}]"
        return f"Residual([{', '.join(map(repr, self._branch))}], scale={self.scale:g}{short})"

    def _lead(self, z) -> Any:
        """``B``, or ``(B, T)`` for a token batch (more axes than ``(B, *in_shape)``)."""
        return z.shape[0] if z.ndim == 1 + len(self.in_shape) else tuple(z.shape[:-len(self.in_shape)])

    def forward_shapes(self, B: Any) -> list:
        """Shapes of the buffers ``forward`` writes: the output ``(B, *out_shape)``, then the inner
        layers' (``B``: an int, or ``(B, T)`` for a token batch)."""
        return [lead_shape(B) + tuple(self.out_shape)] + [s for L, b in zip(self.layers, self._leads(B))
                                                          for s in L.forward_shapes(b)]

    def _leads(self, B: Any) -> list:
        """The leading shape of each inner layer's input (``self.layers`` order): the branch's and the
        shortcut's, each from the block's ``B`` (``protocol.layer.layer_leads``)."""
        return layer_leads(self._branch, B)[:-1] + (layer_leads(self._shortcut, B)[:-1] if self._shortcut else [])

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """Shapes of the buffers ``backward`` writes: ``s·g``, the inner layers', and ``∂L/∂z``."""
        inner = [s for L, b in zip(self.layers, self._leads(B)) for s in L.backward_shapes(b, True)]
        lead = lead_shape(B)
        return [lead + tuple(self.out_shape)] + inner + ([lead + tuple(self.in_shape)] if input_grad else [])

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, *in_shape) -> p(z) + s·f(z)`` (``p`` the identity without a shortcut; per token
        ``(B, T, H)``); returns ``(out, inner states)``; ``out``: the buffers of ``forward_shapes``."""
        if self.in_shape is None:
            self.bind_in_shape(z.shape[1:])
        name = where if isinstance(where, str) else f"layer {where}"
        B = self._lead(z)
        bufs = _buffers(out, self.forward_shapes(B), z)
        ends, states, at = [], [], 1
        leads = self._leads(B)
        for part, first in ((self._branch, 0), (self._shortcut or (), len(self._branch))):
            u = z
            for i, L in enumerate(part):
                n = len(L.forward_shapes(leads[first + i]))
                u, st = L.forward(u, check, f"{name}.{first + i}", bufs[at:at + n])
                states.append(st)
                at += n
            ends.append(u)
        xp = get_xp(z)
        u, skip = ends[0], (ends[1] if self._shortcut is not None else z)
        su = u if self.scale == 1.0 else xp.multiply(u, self.scale, out=bufs[0])  # 1·u is u: skip the pass
        return xp.add(skip, su, out=bufs[0]), states

    def factor(self, state) -> ResidualFactor:
        n = len(self._branch)
        inner = Chain([L.factor(st) for L, st in zip(self._branch, state[:n])])
        short = None if self._shortcut is None else Chain([L.factor(st) for L, st in zip(self._shortcut, state[n:])])
        return ResidualFactor(inner, self.scale, short)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """Inner backward of ``s·g`` (and the shortcut's of ``g``); returns ``(the shortcut's input
        gradient (g itself without one) + the branch's, g)``; ``g`` is only read; ``out``: the
        buffers of ``backward_shapes``; ``sq`` as the inner layers'."""
        name = where if isinstance(where, str) else f"layer {where}"
        k = len(self.out_shape)
        B, xp = (g.shape[0] if g.ndim == 1 + k else tuple(g.shape[:-k])), get_xp(g)
        bufs = _buffers(out, self.backward_shapes(B, input_grad), g)
        layers = self.layers
        at, cut = [0], [1]
        for L, b in zip(layers, self._leads(B)):
            at.append(at[-1] + len(L.params))
            cut.append(cut[-1] + len(L.backward_shapes(b, True)))
        n = len(self._branch)
        u = g if self.scale == 1.0 else xp.multiply(g, self.scale, out=bufs[0])  # the inner layers only read it
        ins = []
        for lo, hi, w in ((0, n, u), (n, len(layers), g)):
            for i in range(hi - 1, lo - 1, -1):
                w, _ = layers[i].backward(state[i], w, grads[at[i]:at[i + 1]], True, check, f"{name}.{i}", sq,
                                          bufs[cut[i]:cut[i + 1]])
            ins.append(w)
        skip = ins[1] if self._shortcut is not None else g
        return (xp.add(skip, ins[0], out=bufs[-1]) if input_grad else None), g


register_layer("residual", Residual)
