"""The linear maps ``L`` of the convolutional family's Jacobian factors ``diag(d) · L``
(``conv.factors.SpatialFactor``), on ``(…, C, H, W)`` images, never formed as a matrix: a
convolution ``C_W`` (``ConvOp``: JVP by convolution, VJP by transposed convolution, both im2col
GEMMs of ``conv.im2col``), an average pool (``AvgPoolOp``), a max pool's selection (``MaxPoolOp``,
the argmax kept per sample), a global mean (``MeanOp``), a per-channel scaling (``ChannelScaleOp``,
eval BatchNorm) and a reshape (``ReshapeOp``, Flatten).

Each map offers ``apply(u, stacked)`` (``L u``), ``adjoint(v, stacked)`` (``Lᵀ v``; ``stacked``: a
stack axis after a per-sample map's batch axis), ``in_shape``/``out_shape`` (per sample),
``batch`` (None unless the map itself is per sample), ``row_cost()`` (multiply-adds per row) and
``norm_bound()`` (an upper bound of ``‖L‖₂``); a per-sample map also ``rows(sel)``.

    >>> import numpy as np
    >>> from jacgrad.conv.im2col import Geometry
    >>> pool = AvgPoolOp(Geometry.make("AvgPool2d", (1, 2, 2), (1, 2, 2), (2, 2), 0, (1, 1)))
    >>> pool.apply(np.arange(4.0).reshape(1, 1, 2, 2)).ravel().tolist(), pool.norm_bound()
    ([1.5], 1.0)
"""

from __future__ import annotations

import math

import numpy as np

from . import im2col as _im2col
from ..core.backend import get_xp

__all__ = ["AvgPoolOp", "ChannelScaleOp", "ConvOp", "MaxPoolOp", "MeanOp", "ReshapeOp"]


class ConvOp:
    """``C_W``: ``(…, C, H, W) -> (…, C_out, H_out, W_out)``; ``Wg: (G, C_out/G, p)``."""

    batch = None

    def __init__(self, Wg, geo: _im2col.Geometry, groups: int, max_memory=None):
        self.Wg, self.geo, self.groups, self.max_memory = Wg, geo, groups, max_memory
        self.in_shape = geo.in_shape
        self.out_shape = (Wg.shape[0] * Wg.shape[1],) + geo.out_hw

    def apply(self, u, stacked: bool = False):
        return _im2col.conv(u, self.Wg, self.geo, self.groups, self.max_memory)

    def adjoint(self, v, stacked: bool = False):
        return _im2col.conv_transpose(v, self.Wg, self.geo, self.groups, self.max_memory)

    def row_cost(self) -> int:
        return int(np.prod(self.out_shape)) * self.Wg.shape[2]

    def norm_bound(self) -> float:
        """The smaller of two bounds of ‖C_W‖₂: ``Σ_k max_g ‖W_g[:, :, k]‖₂`` (a convolution is a sum
        over the kernel offsets of a channel mixing, block-diagonal over groups, after a
        shift-and-subsample of norm ≤ 1), and ``sqrt(cover)·max_g ‖W_g‖₂`` (``C_W = W · im2col``,
        and im2col, a 0/1 selection, has norm ``sqrt(most patches one input lies in)``)."""
        xp = get_xp(self.Wg)
        G, O, p = self.Wg.shape
        W = self.Wg.reshape(G, O, p // self.geo.window, self.geo.window).transpose(3, 0, 1, 2)   # (k, G, O, C/G)
        top = xp.linalg.svd(W, compute_uv=False)[..., 0]                                         # (k, G), one batched SVD
        whole = xp.linalg.svd(self.Wg, compute_uv=False)[..., 0].max()
        return float(min(top.max(axis=1).sum(), math.sqrt(_cover(self.geo)) * whole))


def _cover(geo) -> int:
    """The most windows (patches) one input element lies in: per axis at most ``k`` (one per kernel
    offset) and at most ``ceil(span/s)`` (windows ``s`` apart over a span ``d·(k−1)+1``)."""
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel[1:], geo.stride, geo.dilation
    axis = lambda k, s, d: min(k, max(1, math.ceil((d * (k - 1) + 1) / s)))
    return axis(kh, sh, dh) * axis(kw, sw, dw)


class _Windowed:
    """Shared by the pools: ``geo`` with ``C_out = C`` (one window per channel)."""

    def __init__(self, geo: _im2col.Geometry):
        self.geo = geo
        self.in_shape = geo.in_shape
        self.out_shape = (geo.in_shape[0],) + geo.out_hw

    def _slices(self, u):
        upad = self.geo.pad(u)
        for k, rows, cols in self.geo.offsets():
            yield k, upad[..., rows, cols]

    def _scatter(self, part, lead, like):
        """``Σ_k`` of ``part(k, dst)`` over the window slices ``dst`` of a zero padded image
        ``(*lead, C, Hp, Wp)`` (dtype and device of ``like``), cropped. ``part`` writes window k's
        share into ``dst`` (its ``out=``) where no two windows overlap — each slice is written once
        and no temporary is made — and returns it (added in) where they do."""
        C, H, W = self.in_shape
        t, b, l, r = self.geo.pads
        (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = self.geo.kernel[1:], self.geo.stride, self.geo.dilation, self.geo.out_hw
        disjoint = sh >= dh * (kh - 1) + 1 and sw >= dw * (kw - 1) + 1
        tiled = disjoint and (sh, sw) == (kh, kw) and (dh, dw) == (1, 1) and not any(self.geo.pads) \
            and (H, W) == (Ho * kh, Wo * kw)  # the windows cover every input once: nothing left to zero
        xp = get_xp(like)
        out = (xp.empty if tiled else xp.zeros)(lead + (C, H + t + b, W + l + r), dtype=like.dtype)
        for k, rows, cols in self.geo.offsets():
            dst = out[..., rows, cols]
            if disjoint:
                part(k, dst)
            else:
                dst += part(k, None)
        return self.geo.crop(out)

    def row_cost(self) -> int:
        return int(np.prod(self.out_shape)) * self.geo.window


class AvgPoolOp(_Windowed):
    """Average over each window, zero padding counted (torch's ``count_include_pad=True``)."""

    batch = None

    def apply(self, u, stacked: bool = False):
        acc = None
        for _, s in self._slices(u):
            acc = s.copy() if acc is None else acc.__iadd__(s)
        return acc / self.geo.window

    def adjoint(self, v, stacked: bool = False):
        w = v / self.geo.window

        def part(k, dst):
            if dst is None:
                return w
            dst[...] = w

        return self._scatter(part, v.shape[:-3], w)

    def norm_bound(self) -> float:
        """``Σ_k (1/window)·1 = 1``."""
        return 1.0


class MaxPoolOp(_Windowed):
    """The max pool's selection: output ``(c, t)`` takes input at its window's offset ``arg[b, c, t]``
    (the first maximum, as torch). ``arg: (B, C, H_out, W_out)``, an integer offset ``i·kw + j``."""

    def __init__(self, geo: _im2col.Geometry, arg):
        super().__init__(geo)
        self.arg, self.batch = arg, arg.shape[0]

    def _arg(self, stacked):
        return self.arg[:, None] if stacked else self.arg

    def apply(self, u, stacked: bool = False):
        arg, acc = self._arg(stacked), None
        for k, s in self._slices(u):
            acc = s * (arg == k) if acc is None else acc.__iadd__(s * (arg == k))
        return acc

    def adjoint(self, v, stacked: bool = False):
        arg = self._arg(stacked)
        xp = get_xp(v)
        return self._scatter(lambda k, dst: xp.multiply(v, arg == k, out=dst), v.shape[:-3], v)

    def rows(self, sel) -> "MaxPoolOp":
        return MaxPoolOp(self.geo, self.arg[sel])

    def norm_bound(self) -> float:
        """``sqrt(max windows covering one input)`` ≥ ‖S‖₂ (each column of S has that many ones at most)."""
        return math.sqrt(_cover(self.geo))


class MeanOp:
    """The global average over ``H, W``: ``(…, C, H, W) -> (…, C, 1, 1)``."""

    batch = None

    def __init__(self, in_shape):
        self.in_shape, self.out_shape = tuple(in_shape), (in_shape[0], 1, 1)

    def apply(self, u, stacked: bool = False):
        return u.mean(axis=(-2, -1), keepdims=True)

    def adjoint(self, v, stacked: bool = False):
        H, W = self.in_shape[1:]
        return get_xp(v).broadcast_to(v / (H * W), v.shape[:-2] + (H, W)).copy()

    def row_cost(self) -> int:
        return int(np.prod(self.in_shape))

    def norm_bound(self) -> float:
        return 1.0 / math.sqrt(self.in_shape[1] * self.in_shape[2])


class ChannelScaleOp:
    """``u ⊙ s`` per channel (eval BatchNorm): ``scale: (C,)``, images ``(C, *spatial)``."""

    batch = None

    def __init__(self, scale, in_shape):
        self.scale, self.in_shape, self.out_shape = scale, tuple(in_shape), tuple(in_shape)
        self._s = scale.reshape((-1,) + (1,) * (len(in_shape) - 1))

    def apply(self, u, stacked: bool = False):
        return u * self._s

    adjoint = apply

    def row_cost(self) -> int:
        return int(np.prod(self.in_shape))

    def norm_bound(self) -> float:
        return float(get_xp(self.scale).abs(self.scale).max())


class ReshapeOp:
    """The identity on the flattened rows (Flatten): ``in_shape -> out_shape`` of one size."""

    batch = None

    def __init__(self, in_shape, out_shape):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def apply(self, u, stacked: bool = False):
        return u.reshape(u.shape[:u.ndim - len(self.in_shape)] + self.out_shape).copy()

    def adjoint(self, v, stacked: bool = False):
        return v.reshape(v.shape[:v.ndim - len(self.out_shape)] + self.in_shape).copy()

    def row_cost(self) -> int:
        return int(np.prod(self.in_shape))

    def norm_bound(self) -> float:
        return 1.0
