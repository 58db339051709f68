"""``Activation``: an activation as a layer of its own, ``y = φ(h)`` elementwise, no parameters
— for an activation after a norm or a residual join (pre-activation ResNets), where there is no
Dense before it to carry it. Per token on ``(B, T, n)`` like the other layers.

Its Jacobian is ``diag(φ'(h))`` (a ``DiagonalFactor``); it keeps only a reference to its input
``h`` (the previous layer's output buffer, as a Dense keeps ``z_prev``), and its backward is one
fused ``g ⊙ φ'(h)`` (``kernels.scale_cotangent``: a CUDA kernel on CuPy). Its ``δ`` is the
cotangent at its output (as for the norm layers), and it adds no leaf and no gradient entry.

The width ``n`` is fixed when it is made, or, left out, taken from the layer before it when a
``Sequential`` or a ``Residual`` chains it (``layer_protocol.chained``; a first layer needs it).
On images, ``in_shape=(C, H, W)`` (or ``(C, L)``) makes it act on ``(B, C, H, W)`` batches (the
ReLU after a ResNet block's join): its rows are the flattened images, ``n = C·H·W``.

    >>> import numpy as np
    >>> L = Activation("relu", 3)
    >>> y, state = L.forward(np.array([[-1.0, 0.5, 2.0]]))
    >>> y, L.factor(state).d, L.spec()
    (array([[0. , 0.5, 2. ]]), array([[0., 1., 1.]]), {'kind': 'activation', 'activation': 'relu', 'width': 3})
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from ..cuda import kernels
from ..protocol.token_rows import PerToken
from ..elementwise.activations import Activation as _Row, get as get_activation
from ..algebra.factors import DiagonalFactor
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
    spec_optional = {"in_shape": list}  # on images only

    def __init__(self, activation: str | _Row = "relu", width: int | None = None, in_shape=None, **params: float):
        self._act = get_activation(activation, **params)
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
            raise ValueError(f"Activation({self._act.name!r}): width must be an int ≥ 1 or None, got {width!r}")
        self._width, self._image = None if width is None else int(width), None
        if in_shape is not None:
            shape = tuple(in_shape)
            bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1]
            if len(shape) < 2 or bad:
                raise ValueError(f"Activation({self._act.name!r}): in_shape must be an image shape (C, H, W) or (C, L) "
                                 f"of ints ≥ 1, got {in_shape!r}")
            n = int(np.prod(shape))
            if self._width is not None and self._width != n:
                raise ValueError(f"Activation({self._act.name!r}): width {self._width} but in_shape {shape} "
                                 f"has {n} entries")
            self._width, self._image = n, tuple(int(s) for s in shape)

    activation = property(lambda self: self._act.name, doc="the activation's name")
    n_in = n_out = property(lambda self: self._width, doc="the width n (None until chained)")
    params = property(lambda self: [], doc="none: ``[]``")
    in_shape = out_shape = property(lambda self: self._image or (self._width,),
                                    doc="per sample: ``(n,)``, or the image shape it was made for")
    per_token = property(lambda self: self._image is None, doc="True unless it acts on images")

    def with_width(self, n: int) -> "Activation":
        """This layer with the width ``n`` (itself when it has it already)."""
        return self if self._width == n else Activation(self._act, n)

    def with_in_shape(self, shape) -> "Activation":
        """This layer on images of per-sample ``shape`` ``(C, H, W)`` (``bind_shapes`` gives a width-less one
        the shape of the image layer before it)."""
        return Activation(self._act, self._width, in_shape=shape)

    def spec(self) -> dict:
        out = {"kind": self.kind, "activation": self._act.name, "width": self._width}
        return out if self._image is None else dict(out, in_shape=list(self._image))

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "Activation":
        """The layer of a file's ``spec`` (``activation``, ``width``, ``in_shape`` on images); it has no arrays."""
        return cls(spec["activation"], spec["width"], in_shape=spec.get("in_shape"))

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """``(None, None)``: no arrays declare its width; it keeps the width before it (``netfile``)."""
        return None, None

    def param_leaves(self) -> list:
        return []

    def __repr__(self) -> str:
        return f"Activation({self._act.name!r}, {self._width if self._image is None else self._image})"

    def forward_shapes(self, B: Any) -> list:
        """``[(B, n)]``: the output (``B``: an int, or ``(B, T)``); ``(B, C, H, W)`` on images."""
        self._need_width()
        return [lead_shape(B) + tuple(self.out_shape)]

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list:
        """``[(B, n)]`` for ``∂L/∂h`` when ``input_grad``, else none."""
        self._need_width()
        return [lead_shape(B) + tuple(self.in_shape)] if input_grad else []

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, n)``, ``(B, T, n)`` or, made with ``in_shape``, ``(B, *in_shape)`` -> ``φ(z)`` of its shape."""
        if self._image is None:
            return super().forward(z, check, where, out)
        if getattr(z, "ndim", 0) != 1 + len(self._image) or tuple(z.shape[1:]) != self._image:
            raise ValueError(f"Activation: the input has shape {tuple(getattr(z, 'shape', ()))} but the layer takes "
                             f"(B, {', '.join(map(str, self._image))})")
        B = z.shape[0]
        bufs = _buffers(out, self.forward_shapes(B), z)
        y, h = self._forward_rows(z.reshape(B, -1), check, where, [o.reshape(B, -1) for o in bufs])
        return y.reshape(z.shape), h  # the state: the rows (B, C·H·W) of its input

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
        """See ``_backward_rows``; ``(B, T, n)`` token batches as every per-token layer (``sq``: nothing to add);
        images ``(B, *in_shape)`` on their flattened rows."""
        if self._image is None or g.ndim == 2:
            return super().backward(state, g, grads, input_grad, check, where, None, out)
        B = g.shape[0]
        bufs = _buffers(out, self.backward_shapes(B, input_grad), g)
        gin, _ = self._backward_rows(state, g.reshape(B, -1), grads, input_grad, check, where, None,
                                     [o.reshape(B, -1) for o in bufs])
        return (None if gin is None else gin.reshape(g.shape)), g


register_layer("activation", Activation)
