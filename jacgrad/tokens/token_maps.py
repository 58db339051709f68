"""Layers that act on the token axis of ``(B, T, d)``, the same for every feature (a ViT's):
``ClassToken`` prepends a learned token, ``(B, T, d) -> (B, T + 1, d)``; ``SelectToken`` reads one
token, ``(B, T, d) -> (B, d)`` (a ViT head reads ``x[:, 0]``); ``TokenMean`` averages the tokens,
``(B, T, d) -> (B, d)``. Their factors: ``jacgrad.tokens.token_axis_factor``.

Each changes the leading shape of the batch a network carves buffers for: ``output_lead(B)``
(``nn.stack.layer_leads``). ``ClassToken``'s leaf is an ``ElementwiseLeaf`` whose ``a`` is 1: the
per-sample gradient of the token is ``δ_i,0``, the cotangent at the token's row.

    >>> import numpy as np
    >>> L = ClassToken(np.array([7.0, 8.0]))
    >>> y, _ = L.forward(np.zeros((1, 2, 2)))
    >>> y[0], SelectToken(0, 2).forward(y)[0], TokenMean(2).forward(y)[0]
    (array([[7., 8.],
           [0., 0.],
           [0., 0.]]), array([[7., 8.]]), array([[2.33333333, 2.66666667]]))
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from ..core.validation import float_array, shape_str
from ..core.backend import asarray, get_xp, is_foreign_array
from ..protocol.layer import buffers, register_layer
from ..protocol.leaves import ElementwiseLeaf
from .token_axis_factor import PrependFactor, TokenAxisFactor

__all__ = ["ClassToken", "SelectToken", "TokenMean"]


def _token_lead(layer, B) -> tuple:
    """``B`` as a token batch ``(B, T)``; a ``ValueError`` naming the layer for an int ``B``."""
    if not isinstance(B, (tuple, list)) or len(B) != 2:
        raise ValueError(f"{layer!r} takes token batches (B, T, d): its buffers need the token batch (B, T), got {B!r}")
    return int(B[0]), int(B[1])


class _TokenAxis:
    """What the three layers share: a token batch in, its shape checked with messages that name the layer."""

    per_token = True  # takes token batches (B, T, ·)
    in_shape = property(lambda self: (self.n_in,), doc="per token: ``(d,)``")

    def _where(self, where) -> str:
        return f"{where if isinstance(where, str) else f'layer {where}'} ({self!r})"

    def _need_width(self) -> None:
        if self.n_in is None:
            raise ValueError(f"{self!r} has no width yet: give it d, or put it after a layer in a Sequential, "
                             f"which gives it that layer's width")

    def _check_input(self, z, where) -> tuple:
        self._need_width()
        shape = tuple(getattr(z, "shape", ()))
        if len(shape) != 3 or shape[2] != self.n_in:
            raise ValueError(f"{self._where(where)}: the input has shape {shape_str(shape)}; needs a token batch "
                             f"(B, T, {self.n_in})")
        return shape[0], shape[1]

    def _check_g(self, g, want: tuple, where):
        g = float_array(g, f"{self._where(where)}: grad_y", get_xp(g))
        if tuple(g.shape) != want:
            raise ValueError(f"{self._where(where)}: grad_y has shape {shape_str(g.shape)}; needs {shape_str(want)}")
        return g

    def backward_shapes(self, B, input_grad: bool = True) -> list:
        """``∂L/∂x: (B, T, d)`` when ``input_grad``."""
        self._need_width()
        return [_token_lead(self, B) + (self.n_in,)] if input_grad else []


class ClassToken(_TokenAxis):
    """``y = [c; x]``: the token ``c: (d,)`` (kept by reference) before the ``T`` tokens of each sample;
    torch's ``cat([cls_token.expand(B, -1, -1), x], dim=1)``."""

    kind = "class_token"
    names = ("token",)
    spec_fields: dict = {}

    def __init__(self, token: Any):
        xp = get_xp(asarray(token) if is_foreign_array(token) else token)
        token = float_array(token, "ClassToken: token", xp)
        if token.ndim != 1 or token.shape[0] < 1:
            raise ValueError(f"ClassToken: token must be 1-D (d,), got shape {shape_str(token.shape)} "
                             f"(torch's (1, 1, d) cls_token: pass cls_token.reshape(-1))")
        self._c = token

    token = property(lambda self: self._c, doc="``(d,)``")
    n_in = n_out = d = property(lambda self: self._c.shape[0])
    out_shape = property(lambda self: (self.d,), doc="per token: ``(d,)``")
    params = property(lambda self: [self._c])

    def __repr__(self) -> str:
        return f"ClassToken({self.d})"

    def spec(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "ClassToken":
        return cls(params["token"])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple[int, int]:
        """``(d, d)`` from the file's ``{"token": (shape, key)}``; a ``ValueError`` naming the key unless 1-D."""
        shape, key = shapes["token"]
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"{where} (class_token): array {key!r} has shape {shape_str(shape)}; needs (d,)")
        return int(shape[0]), int(shape[0])

    def output_lead(self, B) -> tuple:
        """``(B, T) -> (B, T + 1)``."""
        B, T = _token_lead(self, B)
        return B, T + 1

    def forward_shapes(self, B) -> list:
        return [self.output_lead(B) + (self.d,)]

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, T, d) -> (B, T + 1, d)``; the state is ``(B, T)``."""
        B, T = self._check_input(z, where)
        (y,) = buffers(out, self.forward_shapes((B, T)), z)
        y[:, 0] = self._c
        y[:, 1:] = z
        return y, (B, T)

    def factor(self, state) -> PrependFactor:
        return PrependFactor(state[0], state[1], self.d, self._c)

    def param_leaves(self) -> list:
        """One ``ElementwiseLeaf`` without shift: ``c`` scales ``a = 1`` at row 0."""
        return [ElementwiseLeaf(bias=False)]

    def param_input(self, state):
        """``a = 1: (B, d)`` (a broadcast view): ``∇c_i = a ⊙ δ_i,0``."""
        xp = get_xp(self._c)
        return xp.broadcast_to(xp.ones(1, dtype=self._c.dtype), (state[0], self.d))

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g: (B, T + 1, d)`` (only read): ``∂c = Σ_i g_i,0`` into ``grads[0]``; returns
        ``(∂L/∂x = g[:, 1:], δ = g[:, 0])``; ``sq`` gets ``‖g_i,0‖²`` added."""
        B, T = state
        g = self._check_g(g, (B, T + 1, self.d), where)
        delta = g[:, 0]
        delta.sum(axis=0, out=grads[0])
        if sq is not None:
            sq += (delta * delta).sum(axis=1)
        gin = None
        if input_grad:
            (gin,) = buffers(out, self.backward_shapes((B, T), True), g)
            gin[...] = g[:, 1:]
        return gin, delta


class _ReadOut(_TokenAxis):
    """A token read-out without parameters, ``(B, T, d) -> (B, d)``; ``d`` given or taken from the
    layer before it (``with_width``)."""

    names = ()
    params = property(lambda self: [], doc="none: ``[]``")
    out_shape = property(lambda self: (self.n_out,), doc="``(d,)``")

    def __init__(self, width: int | None = None):
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
            raise ValueError(f"{type(self).__name__}: width must be an int ≥ 1 or None, got {width!r}")
        self._width = None if width is None else int(width)

    n_in = n_out = property(lambda self: self._width, doc="d (None until chained)")

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """``(None, None)``: no arrays declare its width; it keeps the width before it."""
        return None, None

    def param_leaves(self) -> list:
        return []

    def output_lead(self, B) -> int:
        """``(B, T) -> B``: the token axis is gone."""
        return _token_lead(self, B)[0]

    def forward_shapes(self, B) -> list:
        self._need_width()
        return [(self.output_lead(B), self._width)]

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, T, d) -> y: (B, d)``; the state is ``(B, T, anchor)`` (an empty array of z's
        dtype and device, for the factor)."""
        B, T = self._check_input(z, where)
        self._check_tokens(T, where)
        (y,) = buffers(out, self.forward_shapes((B, T)), z)
        anchor = get_xp(z).empty(0, dtype=z.dtype)
        y[...] = self._factor(B, T, anchor).jvp(z)
        return y, (B, T, anchor)

    def _check_tokens(self, T: int, where) -> None:
        if T < 1:
            raise ValueError(f"{self._where(where)}: the input has no tokens (T = 0)")

    def factor(self, state) -> TokenAxisFactor:
        return self._factor(*state)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g: (B, d)`` (only read) -> ``(∂L/∂x: (B, T, d), δ = g)``; no parameters."""
        B, T, anchor = state
        g = self._check_g(g, (B, self._width), where)
        gin = None
        if input_grad:
            (gin,) = buffers(out, self.backward_shapes((B, T), True), g)
            gin[...] = self._factor(B, T, anchor).vjp(g)
        return gin, g


class SelectToken(_ReadOut):
    """``y = x[:, index]``: ``(B, T, d) -> (B, d)``; ``index`` in ``[-T, T)`` (checked at the forward pass)."""

    kind = "select_token"
    spec_fields = {"index": int, "width": (int, type(None))}

    def __init__(self, index: int = 0, width: int | None = None):
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"SelectToken: index must be an int, got {index!r}")
        self.index = int(index)
        super().__init__(width)

    def with_width(self, n: int) -> "SelectToken":
        return self if self._width == n else SelectToken(self.index, n)

    def __repr__(self) -> str:
        return f"SelectToken({self.index}, {self._width})"

    def spec(self) -> dict:
        return {"kind": self.kind, "index": self.index, "width": self._width}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "SelectToken":
        return cls(spec["index"], spec["width"])

    def _check_tokens(self, T: int, where) -> None:
        if not -T <= self.index < T:
            raise IndexError(f"{self._where(where)}: token index {self.index} is out of range for an input of "
                             f"T = {T} tokens (valid: {-T} … {T - 1})")

    def _factor(self, B: int, T: int, anchor) -> TokenAxisFactor:
        return TokenAxisFactor("select", B, T, self._width, anchor, self.index % T)


class TokenMean(_ReadOut):
    """``y = x.mean(1)``: the mean over the tokens, ``(B, T, d) -> (B, d)``."""

    kind = "token_mean"
    spec_fields = {"width": (int, type(None))}

    def with_width(self, n: int) -> "TokenMean":
        return self if self._width == n else TokenMean(n)

    def __repr__(self) -> str:
        return f"TokenMean({self._width})"

    def spec(self) -> dict:
        return {"kind": self.kind, "width": self._width}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "TokenMean":
        return cls(spec["width"])

    def _factor(self, B: int, T: int, anchor) -> TokenAxisFactor:
        return TokenAxisFactor("mean", B, T, self._width, anchor)


register_layer("class_token", ClassToken)
register_layer("select_token", SelectToken)
register_layer("token_mean", TokenMean)
