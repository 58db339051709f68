"""``PReLU``: torch's ``nn.PReLU``, ``y = max(x, 0) + a·min(x, 0)`` with a learned slope ``a`` — one
for every entry, or one per channel (axis 1 of ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)``, as torch).

A parameterised activation layer: its Jacobian is ``diag(d)``, ``d = 1`` where ``x > 0`` and ``a``
elsewhere (a ``SpatialFactor`` of the identity map with that diagonal), and its one leaf is
elementwise (``ElementwiseLeaf`` without a shift): the slope acts at the output, so per sample

    ∂ℓ_i/∂a_c = Σ_t δ_i,t,c · min(x_i,t,c, 0)

over the positions ``t`` of channel ``c`` (all entries for one shared slope), ``δ`` the cotangent
at the output. ``param_input(state)`` is ``min(x, 0)`` channels-last ``(B, T, C)`` (``(B, n, 1)``
for one slope), paired with ``δ`` in the same layout.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.PReLU(np.array([0.25]), in_shape=(2,))
    >>> L.forward(np.array([[-2.0, 3.0]]))[0].tolist()
    [[-0.5, 3.0]]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.backend import get_xp
from ..core.validation import float_array, shape_str
from ..protocol.layer import register_layer
from ..protocol.leaves import ElementwiseLeaf
from .factors import SpatialFactor
from .ops import ReshapeOp
from .leaves import to_images, to_tokens

__all__ = ["PReLU"]


class PReLUFactor(SpatialFactor):
    """``diag(d)`` on the flattened images, split at the slope (which acts at the output): the leaf's
    cotangents and tangents are channels-last ``(B, [R,] T, C)``, or ``(B, [R,] n, 1)`` for one slope."""

    __slots__ = ("shared",)

    def __init__(self, op, d, anchor, shared: bool):
        super().__init__(op, d, anchor)
        self.shared = shared

    def _tokens(self, img, n_lead: int):
        if self.shared:
            return get_xp(img).ascontiguousarray(img.reshape(img.shape[:n_lead] + (-1, 1)))
        return to_tokens(img, n_lead)

    def rows(self, sel) -> "PReLUFactor":
        F = super().rows(sel)
        return PReLUFactor(F.op, F.d, F.anchor, self.shared)

    def param_vjp_stack(self, A: Any, need_input: bool = True):
        """``([G], A_in)`` for output cotangent rows ``A: (B, R, n)``: ``G = A`` as tokens, ``A_in = A ⊙ d``."""
        B, R = A.shape[:2]
        G = self._tokens(A.reshape((B, R) + tuple(self.op.out_shape)), 2)
        return [G], (self.vjp_stack(A.reshape(B, R, self.h_out)) if need_input else None)

    def param_jvp(self, t: Any, leaf_tangent):
        """``d ⊙ t + min(x, 0) ⊙ ȧ``: ``t: (B, n)`` or None (0) -> ``(B, n)``."""
        base = None
        if t is not None:
            base = self._tokens(self.jvp(t).reshape((t.shape[0],) + tuple(self.op.out_shape)), 1)
        out = leaf_tangent(0, base)
        img = out.reshape(out.shape[0], -1) if self.shared else to_images(out, self.op.out_shape)
        return img.reshape(img.shape[0], self.h_out)


class PReLU:
    """``torch.nn.PReLU``: ``weight: (1,)`` (one slope) or ``(C,)`` (one per channel, axis 1);
    ``in_shape``: ``(C,)``, ``(C, L)`` or ``(C, H, W)`` per sample (optional: ``Sequential`` gives it
    the shape before it). Keeps its input for backward."""

    kind = "prelu"
    names = ("weight",)
    spec_fields = {"in_shape": (list, type(None))}

    def __init__(self, weight: Any, in_shape: Sequence[int] | None = None):
        w = float_array(weight, "weight", get_xp(weight))
        if w.ndim != 1 or w.shape[0] < 1:
            raise ValueError(f"PReLU: weight must be (1,) or (C,), got shape {shape_str(w.shape)}")
        self._w = w
        self.in_shape = None if in_shape is None else self.output_shape(in_shape)
        self.out_shape = self.in_shape

    weight = property(lambda self: self._w, doc="the slopes ``a``: ``(1,)`` or ``(C,)``")
    num_parameters = property(lambda self: self._w.shape[0])
    params = property(lambda self: [self._w])
    n_in = n_out = property(lambda self: None if self.in_shape is None else int(np.prod(self.in_shape)))

    def __repr__(self) -> str:
        return f"PReLU({self.num_parameters})"

    def output_shape(self, in_shape) -> tuple:
        """``in_shape`` itself, checked: ``(C, …)`` of 1 to 3 axes, C = the slopes' count unless one."""
        shape = tuple(int(s) for s in in_shape)
        if not 1 <= len(shape) <= 3 or (self.num_parameters > 1 and shape[0] != self.num_parameters):
            raise ValueError(f"PReLU({self.num_parameters}): in_shape {shape} is not (C,), (C, L) or (C, H, W)"
                             + (f" with C = {self.num_parameters}" if self.num_parameters > 1 else ""))
        return shape

    def bind_in_shape(self, in_shape) -> tuple:
        """Fix the per-sample input shape (``Sequential``); returns ``out_shape`` (the same)."""
        shape = self.output_shape(in_shape)
        if self.in_shape is not None and self.in_shape != shape:
            raise ValueError(f"{self!r} was built for inputs {self.in_shape} but is given {shape}")
        self.in_shape = self.out_shape = shape
        return shape

    def spec(self) -> dict:
        return {"kind": self.kind, "in_shape": None if self.in_shape is None else list(self.in_shape)}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "PReLU":
        return cls(params["weight"], spec["in_shape"])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple:
        """The weight is 1-D; ``(None, None)``: widths are not chained through it (it has the input's)."""
        shape, key = shapes["weight"]
        if len(shape) != 1:
            raise ValueError(f"layer {where} (prelu): {key} must be 1-D (1,) or (C,), got shape {shape}")
        return None, None

    def param_leaves(self) -> list:
        return [ElementwiseLeaf(bias=False)]

    def forward_shapes(self, B: int) -> list:
        if self.in_shape is None:
            raise ValueError(f"{self!r}: forward_shapes needs in_shape; build the layer with in_shape=(C, ...)")
        return [(B,) + self.in_shape]

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        return [(B,) + self.in_shape] if input_grad else []

    def _slope(self, x):
        return self._w if self.num_parameters == 1 else self._w.reshape((-1,) + (1,) * (x.ndim - 2))

    def _check(self, x) -> None:
        if self.in_shape is not None and tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"{self!r}: the input has shape {shape_str(x.shape)} but the layer takes "
                             f"(B, {', '.join(map(str, self.in_shape))})")
        if self.in_shape is None:
            self.output_shape(x.shape[1:])

    def forward(self, x, check=None, where: Any = 0, out=None):
        """``x: (B, C, …) -> max(x, 0) + a·min(x, 0)``; the state is ``x`` (a reference)."""
        self._check(x)
        xp = get_xp(x, self._w)
        y = out[0] if out is not None else xp.empty_like(x)
        xp.multiply(xp.minimum(x, 0), self._slope(x), out=y)
        y += xp.maximum(x, 0)
        if check is not None:
            check(y, f"{where if isinstance(where, str) else f'layer {where}'}: output")
        return y, x

    def _derivative(self, x):
        xp = get_xp(x)
        return xp.where(x > 0, xp.ones((), x.dtype), self._slope(x)).astype(x.dtype, copy=False)

    def factor(self, x) -> PReLUFactor:
        """``diag(d)``, ``d = 1`` where ``x > 0``, else the slope."""
        shape = tuple(x.shape[1:])
        return PReLUFactor(ReshapeOp(shape, shape), self._derivative(x), self._w, self.num_parameters == 1)

    def backward(self, x, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``∂a = Σ g ⊙ min(x, 0)`` (over the batch and each channel's positions), ``∂L/∂x = g ⊙ d``;
        returns ``(∂L/∂x or None, g)``; ``sq: (B,)`` gets each sample's ``‖∂a_i‖²`` added."""
        xp = get_xp(g)
        gm = g * xp.minimum(x, 0)
        per = gm.reshape(g.shape[0], -1).sum(axis=1, keepdims=True) if self.num_parameters == 1 else \
            gm.reshape(g.shape[:2] + (-1,)).sum(axis=2)                                  # (B, 1) or (B, C)
        grads[0][...] = per.sum(axis=0)
        if sq is not None:
            sq += (per * per).sum(axis=1)
        if not input_grad:
            return None, g
        return xp.multiply(g, self._derivative(x), out=out[0] if out else None), g

    def param_input(self, x):
        """``min(x, 0)`` channels-last ``(B, T, C)`` (``(B, n, 1)`` for one slope): the leaf's ``a``."""
        m = get_xp(x).minimum(x, 0)
        return m.reshape(m.shape[0], -1, 1) if self.num_parameters == 1 else to_tokens(m, 1)


register_layer("prelu", PReLU)
