"""Pooling and reshaping layers without parameters, as ``torch.nn``: ``AvgPool2d``, ``MaxPool2d``,
``AdaptiveAvgPool2d(1)`` (global average pooling) and ``Flatten``. Inputs ``(B, C, H, W)``.

Their Jacobians are ``conv_factors.SpatialFactor``s: the average pool and the global mean are
shared by every sample; the max pool keeps, per sample, the offset of each window's first
maximum (torch's choice among ties) as a selection factor — the VJP routes each output's
cotangent to the input it took, the JVP reads the tangent there. Flatten is the identity on
the flattened rows.

    >>> import numpy as np, jacgrad as jg
    >>> P = jg.layers.MaxPool2d(2)
    >>> y, state = P.forward(np.arange(16.0).reshape(1, 1, 4, 4))
    >>> y[0, 0].tolist(), P.factor(state).vjp(np.ones((1, 4))).reshape(4, 4)[1].tolist()
    ([[5.0, 7.0], [13.0, 15.0]], [0.0, 1.0, 0.0, 1.0])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .im2col import Geometry, pair
from ..core.validation import shape_str
from ..core.backend import get_xp
from .factors import SpatialFactor
from .ops import AvgPoolOp, MaxPoolOp, MeanOp, ReshapeOp
from ..protocol.layer import register_layer

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "Flatten", "MaxPool2d"]


def _images(layer, z):
    if z.ndim != 4:
        raise ValueError(f"{type(layer).__name__}: input of shape {shape_str(z.shape)} has {z.ndim} axes; "
                         f"the layer takes images (B, C, H, W)")


class _NoParams:
    """The protocol's parameter side, empty; ``in_shape`` (per sample) optional, as the convolutions'."""

    names: tuple = ()
    params: list = []

    def _set_in_shape(self, in_shape):
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self.out_shape = None if in_shape is None else self.output_shape(self.in_shape)

    def bind_in_shape(self, in_shape) -> tuple:
        """Fix the per-sample input shape (``Sequential`` passes each layer its predecessor's
        output); returns ``out_shape``. A layer built with another ``in_shape`` is a ``ValueError``."""
        in_shape = tuple(int(s) for s in in_shape)
        if self.in_shape is not None and self.in_shape != in_shape:
            raise ValueError(f"{self!r} was built for inputs {self.in_shape} but is given {in_shape}")
        self._set_in_shape(in_shape)
        return self.out_shape

    def param_leaves(self) -> list:
        return []

    def _spec(self, **fields) -> dict:
        return {"kind": self.kind, **fields, "in_shape": None if self.in_shape is None else list(self.in_shape)}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None):
        """The layer of a file's ``spec`` (its fields as the constructor's keywords; lists as tuples)."""
        kw = {k: tuple(v) if isinstance(v, list) and k != "in_shape" else v for k, v in spec.items() if k != "kind"}
        return cls(**kw)

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """No arrays; ``(None, None)``: image widths do not chain."""
        return None, None

    n_in = property(lambda self: None if self.in_shape is None else int(np.prod(self.in_shape)))
    n_out = property(lambda self: None if self.out_shape is None else int(np.prod(self.out_shape)))

    def _need_shape(self, what: str):
        if self.out_shape is None:
            raise ValueError(f"{self!r}: {what} needs in_shape; build the layer with in_shape=(C, H, W)")

    def forward_shapes(self, B: int) -> list:
        """``[(B, *out_shape)]``: the output."""
        self._need_shape("forward_shapes")
        return [(B,) + self.out_shape]

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        """``[(B, *in_shape)]`` (``∂L/∂z``) with ``input_grad``, else none."""
        self._need_shape("backward_shapes")
        return [(B,) + self.in_shape] if input_grad else []

    def backward(self, state, g, grads: Sequence[Any] = (), input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``(∂L/∂z or None, g)``: the factor's VJP of ``g`` (only read), into ``out[0]`` when given."""
        if not input_grad:
            return None, g
        gin = self.factor(state).vjp(g.reshape(g.shape[0], -1)).reshape((g.shape[0],) + tuple(state[0]))
        if out:
            out[0][...] = gin
            gin = out[0]
        return gin, g

    def _write(self, y, out):
        if out:
            out[0][...] = y
            return out[0]
        return y


class _Window(_NoParams):
    def __init__(self, kernel_size, stride, padding, dilation, in_shape):
        name = type(self).__name__
        self._k = pair(kernel_size, "kernel_size", name, 1)
        self._s = self._k if stride is None else pair(stride, "stride", name, 1)
        self._p = pair(padding, "padding", name, 0)
        self._d = pair(dilation, "dilation", name, 1)
        if self._p[0] > self._k[0] // 2 or self._p[1] > self._k[1] // 2:
            raise ValueError(f"{name}: padding {self._p} must be at most half the kernel {self._k} (as in torch)")
        self._geos: dict = {}
        self._set_in_shape(in_shape)

    def geometry(self, in_shape) -> Geometry:
        key = tuple(in_shape)
        if key not in self._geos:
            self._geos[key] = Geometry.make(type(self).__name__, key, (key[0],) + self._k, self._s, self._p, self._d)
        return self._geos[key]

    def output_shape(self, in_shape) -> tuple:
        if len(in_shape) != 3:
            raise ValueError(f"{type(self).__name__}: in_shape {tuple(in_shape)} is not (C, H, W)")
        return (in_shape[0],) + self.geometry(in_shape).out_hw

    def spec(self) -> dict:
        return self._spec(kernel_size=list(self._k), stride=list(self._s), padding=list(self._p),
                          **({"dilation": list(self._d)} if self.kind == "maxpool2d" else {}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self._k}, stride={self._s}, padding={self._p})"


class AvgPool2d(_Window):
    """``torch.nn.AvgPool2d(kernel_size, stride=None, padding=0)`` (``count_include_pad=True``,
    ``ceil_mode=False``): a linear map shared by every sample. State: the input's shape."""

    kind = "avgpool2d"
    spec_fields = {"kernel_size": (int, list), "stride": (int, list), "padding": (int, list), "in_shape": (list, type(None))}

    def __init__(self, kernel_size, stride=None, padding=0, in_shape=None):
        super().__init__(kernel_size, stride, padding, 1, in_shape)

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``(B, C, H, W) -> (B, C, H_out, W_out)``; returns ``(y, state)``."""
        _images(self, z)
        geo = self.geometry(z.shape[1:])
        return self._write(AvgPoolOp(geo).apply(z), out), (z.shape[1:], geo, z)

    def factor(self, state) -> SpatialFactor:
        return SpatialFactor(AvgPoolOp(state[1]), anchor=state[2])


class MaxPool2d(_Window):
    """``torch.nn.MaxPool2d(kernel_size, stride=None, padding=0, dilation=1)`` (``ceil_mode=False``;
    padding is −∞). State: each output's window offset ``arg: (B, C, H_out, W_out)`` (int8 for windows
    of up to 127 elements, else int32)."""

    kind = "maxpool2d"
    spec_fields = {**AvgPool2d.spec_fields, "dilation": (int, list)}

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, in_shape=None):
        super().__init__(kernel_size, stride, padding, dilation, in_shape)

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``(B, C, H, W) -> (B, C, H_out, W_out)``; the first maximum of each window wins."""
        _images(self, z)
        xp, geo = get_xp(z), self.geometry(z.shape[1:])
        zpad = geo.pad(z, value=-np.inf)
        windows = [zpad[:, :, rows, cols] for _, rows, cols in geo.offsets()]
        best = windows[0].copy()
        # the offset of the first maximum (torch's choice among ties): k only where window k beats the
        # running maximum strictly, kept by a max over the increasing k's — arithmetic on whole arrays
        # (a masked copy per window branches on every element: 5× slower on the CPU)
        arg = xp.zeros(best.shape, dtype=xp.int8 if geo.window <= 127 else xp.int32)
        gt, k_gt = xp.empty(best.shape, dtype=bool), xp.empty_like(arg)
        for k, s in enumerate(windows[1:], 1):
            xp.greater(s, best, out=gt)
            xp.maximum(best, s, out=best)
            xp.multiply(gt, arg.dtype.type(k), out=k_gt)
            xp.maximum(arg, k_gt, out=arg)
        xp.multiply(arg, best == best, out=arg)  # a NaN window: offset 0 (no window equals its maximum)
        return self._write(best, out), (z.shape[1:], geo, arg, z)

    def factor(self, state) -> SpatialFactor:
        return SpatialFactor(MaxPoolOp(state[1], state[2]), anchor=state[3])


class AdaptiveAvgPool2d(_NoParams):
    """``torch.nn.AdaptiveAvgPool2d(1)``: global average pooling ``(B, C, H, W) -> (B, C, 1, 1)``.
    Other output sizes are refused."""

    kind = "adaptiveavgpool2d"
    spec_fields = {"output_size": int, "in_shape": (list, type(None))}

    def __init__(self, output_size=1, in_shape=None):
        if output_size not in (1, (1, 1), [1, 1]):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 (global average pooling) is supported, got "
                             f"{output_size!r}; for other sizes use AvgPool2d with the matching kernel and stride")
        self._set_in_shape(in_shape)

    def output_shape(self, in_shape) -> tuple:
        return (in_shape[0], 1, 1)

    def spec(self) -> dict:
        return self._spec(output_size=1)

    def __repr__(self) -> str:
        return "AdaptiveAvgPool2d(1)"

    def forward(self, z, check=None, where: Any = 0, out=None):
        _images(self, z)
        return self._write(z.mean(axis=(2, 3), keepdims=True), out), (z.shape[1:], z)

    def factor(self, state) -> SpatialFactor:
        return SpatialFactor(MeanOp(state[0]), anchor=state[1])


class Flatten(_NoParams):
    """``torch.nn.Flatten()`` (``start_dim=1, end_dim=-1``): ``(B, *shape) -> (B, prod(shape))``.
    The output is a view of the input unless ``out`` is given."""

    kind = "flatten"
    spec_fields = {"in_shape": (list, type(None))}

    def __init__(self, start_dim: int = 1, end_dim: int = -1, in_shape=None):
        if (start_dim, end_dim) != (1, -1):
            raise ValueError(f"Flatten: only start_dim=1, end_dim=-1 (keep the batch axis, flatten the rest) is "
                             f"supported, got start_dim={start_dim}, end_dim={end_dim}")
        self._set_in_shape(in_shape)

    def output_shape(self, in_shape) -> tuple:
        return (int(np.prod(in_shape)),)

    def spec(self) -> dict:
        return self._spec()

    def __repr__(self) -> str:
        return "Flatten()"

    def forward(self, z, check=None, where: Any = 0, out=None):
        if z.ndim < 2:
            raise ValueError(f"Flatten: input of shape {shape_str(z.shape)} has no axis after the batch axis")
        return self._write(z.reshape(z.shape[0], -1), out), (z.shape[1:], z)

    def factor(self, state) -> SpatialFactor:
        return SpatialFactor(ReshapeOp(state[0], self.output_shape(state[0])), anchor=state[1])


for _cls in (AvgPool2d, MaxPool2d, AdaptiveAvgPool2d, Flatten):
    register_layer(_cls.kind, _cls)
