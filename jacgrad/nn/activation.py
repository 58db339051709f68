"""``Activation``: an activation as a layer of its own, ``y = φ(h)`` elementwise, no parameters
— for an activation after a norm or a residual join (pre-activation ResNets), where there is no
Dense before it to carry it. Per token on ``(B, T, n)`` like the other layers.

Its Jacobian is ``diag(φ'(h))`` (a ``DiagonalFactor``); it keeps only a reference to its input
``h`` (the previous layer's output buffer, as a Dense keeps ``z_prev``), and its backward is one
fused ``g ⊙ φ'(h)`` (``kernels.scale_cotangent``: a CUDA kernel on CuPy). Its ``δ`` is the
cotangent at its output (as for the norm layers), and it adds no leaf and no gradient entry.

The width ``n`` is fixed when it is made, or, left out, taken from the layer before it when a
``Sequential`` or a ``Residual`` chains it (``layer_protocol.chained``; a first layer needs it).

    >>> import numpy as np
    >>> L = Activation("relu", 3)
    >>> y, state = L.forward(np.array([[-1.0, 0.5, 2.0]]))
    >>> y, L.factor(state).d, L.spec()
    (array([[0. , 0.5, 2. ]]), array([[0., 1., 1.]]), {'kind': 'activation', 'activation': 'relu', 'width': 3})
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from ..cuda import kernels
from ..protocol.token_rows import PerToken
from ..elementwise.activations import Activation as _Row, get as get_activation
from ..algebra.diag_factor import DiagonalFactor
from ..protocol.layer import buffers as _buffers, lead_shape, register_layer

__all__ = ["Activation"]


class Activation(PerToken):
    """``y = φ(h)`` elementwise, ``φ`` a row of ``jacgrad.elementwise.activations`` (a name, with parameters
    as keywords or in its spelling: ``Activation("leaky_relu", 8, negative_slope=0.2)``);
    ``width``: ``n`` of its ``(B, n)`` / ``(B, T, n)`` input, or None (see the module text).
    An unknown name is a ``KeyError`` listing the valid ones."""

    kind = "activation"
    names = ()
    spec_fields = {"activation": str, "width": int}

    def __init__(self, activation: str | _Row = "relu", width: int | None = None, **params: float):
        self._act = get_activation(activation, **params)
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
            raise ValueError(f"Activation({self._act.name!r}): width must be an int ≥ 1 or None, got {width!r}")
        self._width = None if width is None else int(width)

    activation = property(lambda self: self._act.name, doc="the activation's name")
    n_in = n_out = property(lambda self: self._width, doc="the width n (None until chained)")
    params = property(lambda self: [], doc="none: ``[]``")

    def with_width(self, n: int) -> "Activation":
        """This layer with the width ``n`` (itself when it has it already)."""
        return self if self._width == n else Activation(self._act, n)

    def spec(self) -> dict:
        return {"kind": self.kind, "activation": self._act.name, "width": self._width}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Activation":
        """The layer of a file's ``spec`` (``activation``, ``width``); it has no arrays."""
        return cls(spec["activation"], spec["width"])

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """``(None, None)``: no arrays declare its width; it keeps the width before it (``netfile``)."""
        return None, None

    def param_leaves(self) -> list:
        return []

    def __repr__(self) -> str:
        return f"Activation({self._act.name!r}, {self._width})"

    def forward_shapes(self, B: Any) -> list:
        """``[(B, n)]``: the output (``B``: an int, or ``(B, T)``)."""
        self._need_width()
        return [lead_shape(B) + (self._width,)]

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """``[(B, n)]`` for ``∂L/∂h`` when ``input_grad``, else none."""
        self._need_width()
        return [lead_shape(B) + (self._width,)] if input_grad else []

    def _need_width(self) -> None:
        if self._width is None:
            raise ValueError(f"{self!r} has no width yet: give Activation({self._act.name!r}, n), or put it after a "
                             f"layer in a Sequential or Residual, which gives it that layer's width")

    def _check_input(self, z) -> None:
        self._need_width()
        super()._check_input(z)

    def _forward_rows(self, h, check=None, where: Any = 0, out=None):
        """``h: (N, n) -> y = φ(h)``, into ``out[0]`` when given; the state is ``h`` itself (a reference)."""
        y = _buffers(out, self.forward_shapes(h.shape[0]), h)[0]
        y = kernels.activation_forward(h, self._act, out=y)
        if check is not None:
            check(y, f"{where if isinstance(where, str) else f'layer {where}'}: output")
        return y, h

    def _factor_rows(self, h) -> DiagonalFactor:
        return DiagonalFactor(kernels.derivative(h, self._act))

    def _backward_rows(self, h, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                       sq=None, out=None):
        """``(g ⊙ φ'(h) or None, g)``: ``g = ∂L/∂y`` only read; no parameter gradient, nothing added to ``sq``."""
        if not input_grad:
            return None, g
        gin = _buffers(out, self.backward_shapes(g.shape[0], True), g)[-1]
        gin = kernels.scale_cotangent(g, h, self._act, out=gin)
        if check is not None:
            check(gin, f"{where if isinstance(where, str) else f'layer {where}'}: input gradient")
        return gin, g

    def backward(self, state, g, grads, input_grad: bool = True, check=None, where: Any = 0, sq=None, out=None, **kw):
        """See ``_backward_rows``; ``(B, T, n)`` token batches as every per-token layer (``sq``: nothing to add)."""
        return super().backward(state, g, grads, input_grad, check, where, None, out)


register_layer("activation", Activation)
