"""The Jacobian factors of the convolutional family: ``diag(d) · L`` with ``L`` a linear map on
``(C, H, W)`` images, never formed as a matrix.

``L`` is one of: a convolution ``C_W`` (JVP by convolution, VJP by transposed convolution, both
im2col GEMMs of ``_im2col``), an average pool, a max pool's selection (the argmax kept per
sample), a global mean, a per-channel scaling (eval BatchNorm) or a reshape (Flatten). ``d``
(``(B, C_out, H_out, W_out)`` per sample, or None for 1) is the activation's ``φ'(h)``.

A ``SpatialFactor`` offers the protocol ``Chain`` reads (``factors.py``): rows are the images
flattened C-major, ``u: (B, C·H·W)``; ``vjp``, ``jvp``, ``jvp_stack``/``vjp_stack`` on
``(…, r, n)`` stacks, ``dense`` (tests and tiny layers only), ``rows``, ``norm_bound``,
``singular_values``, ``spectral_norm`` (batched Lanczos on ``JᵀJ``, ``_lanczos``), ``row_cost``,
``dense_cost``, ``h_in``/``h_out``/``batch``/``per_sample``/``dtype``/``xp``/``anchor``.

    >>> import numpy as np
    >>> from jacgrad.conv.im2col import Geometry
    >>> geo = Geometry.make("Conv2d", (1, 3, 3), (1, 2, 2), (1, 1), 0, (1, 1))
    >>> F = SpatialFactor(ConvOp(np.ones((1, 1, 4)), geo, 1))
    >>> F.jvp(np.arange(9.0)[None]).tolist()          # 2×2 box sums of [[0,1,2],[3,4,5],[6,7,8]]
    [[8.0, 12.0, 20.0, 24.0]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import im2col as _im2col
from ..algebra.lanczos import top_eigenvalues
from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from ..algebra.jacobian import _check_sample_selection
from ..algebra.spectra import singular_values as _svd

__all__ = ["AvgPoolOp", "ChannelScaleOp", "ConvOp", "MaxPoolOp", "MeanOp", "ReshapeOp", "SpatialFactor"]


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


class SpatialFactor:
    """``diag(d) · L``: ``op`` the linear map ``L`` (one of this module's ops), ``d: (B, *out_shape)``
    per sample or None (1). Per sample when ``d`` or ``op`` is (a max pool's selection)."""

    __slots__ = ("op", "d", "batch", "h_in", "h_out", "_anchor")

    def __init__(self, op, d: Any = None, anchor: Any = None):
        self.op, self.d = op, d
        if d is not None and tuple(d.shape[1:]) != tuple(op.out_shape):
            raise ValueError(f"d has shape {shape_str(d.shape)}; the map's output is {shape_str(op.out_shape)} per sample")
        if d is not None and op.batch is not None and d.shape[0] != op.batch:
            raise ValueError(f"d has {d.shape[0]} samples but the map {op.batch}")
        self.batch = d.shape[0] if d is not None else op.batch
        self.h_in, self.h_out = int(np.prod(op.in_shape)), int(np.prod(op.out_shape))
        self._anchor = anchor if anchor is not None else d if d is not None else getattr(op, "Wg", None)
        if self._anchor is None:
            raise ValueError("SpatialFactor: give anchor= (an array on the factor's device and dtype) for a map without weights")

    per_sample = property(lambda self: self.batch is not None)
    anchor = property(lambda self: self._anchor)
    xp = property(lambda self: get_xp(self._anchor))
    dtype = property(lambda self: self._anchor.dtype)

    @property
    def row_cost(self) -> int:
        """Multiply-adds per row of a product: the map's, and the diagonal's."""
        return self.op.row_cost() + (self.h_out if self.d is not None else 0)

    @property
    def dense_cost(self) -> int:
        """Forming ``dense()``: ``h_in`` rows of the JVP per sample."""
        return self.h_in * self.row_cost * (self.batch or 1)

    def __repr__(self) -> str:
        b = f"B={self.batch}, " if self.per_sample else "shared, "
        return f"SpatialFactor({type(self.op).__name__}, {b}{self.op.in_shape} -> {self.op.out_shape})"

    def _rows(self, a, width: int, what: str, stack: bool):
        a = float_array(a, what, get_xp(a, self._anchor))
        want = "(…, r, n)" if stack else "(N, n)"
        if a.shape[-1:] != (width,) or a.ndim not in ((2, 3) if stack else (1, 2)):
            raise ValueError(f"{what} has shape {shape_str(a.shape)} but this factor maps {self.h_in} -> "
                             f"{self.h_out}: needs {want} with n = {width}")
        if self.per_sample and not stack and (a.ndim != 2 or a.shape[0] != self.batch):
            raise ValueError(f"{what} has shape {shape_str(a.shape)} but the factor is per sample with "
                             f"B={self.batch}: needs ({self.batch}, {width})")
        if self.per_sample and stack and a.ndim == 2:
            a = get_xp(a).broadcast_to(a, (self.batch,) + a.shape)
        return a

    def _forward(self, u, stacked: bool):
        lead = u.shape[:-1]
        y = self.op.apply(u.reshape(lead + self.op.in_shape), stacked and self.per_sample)
        if self.d is not None:
            y = y * (self.d[:, None] if stacked else self.d)
        return y.reshape(lead + (self.h_out,))

    def _backward(self, v, stacked: bool):
        lead = v.shape[:-1]
        v = v.reshape(lead + self.op.out_shape)
        if self.d is not None:
            v = v * (self.d[:, None] if stacked else self.d)
        return self.op.adjoint(v, stacked and self.per_sample).reshape(lead + (self.h_in,))

    def jvp(self, u: Any):
        """``J u``: ``u (B, h_in) -> (B, h_out)`` (``(N, h_in)`` when shared)."""
        return self._forward(self._rows(u, self.h_in, "tangent", False), False)

    def vjp(self, v: Any):
        """``Jᵀ v``: ``v (B, h_out) -> (B, h_in)``."""
        return self._backward(self._rows(v, self.h_out, "cotangent", False), False)

    def jvp_stack(self, a):
        """``J`` on every row of ``a: (…, r, h_in)`` -> ``(B, r, h_out)`` (``(r, h_out)`` when all is shared)."""
        a = self._rows(a, self.h_in, "tangent stack", True)
        return self._forward(a, a.ndim == 3)

    def vjp_stack(self, a):
        """``Jᵀ`` on every row of ``a: (…, r, h_out)``."""
        a = self._rows(a, self.h_out, "cotangent stack", True)
        return self._backward(a, a.ndim == 3)

    def dense(self, transposed: bool = False):
        """``(B, h_out, h_in)`` or ``(h_out, h_in)``, from ``Jᵀ`` on the identity: tests and tiny layers only."""
        J = self.vjp_stack(self.xp.eye(self.h_out, dtype=self.dtype))   # row k: Jᵀ e_k, the k-th row of J
        return self.xp.ascontiguousarray(J.swapaxes(-1, -2)) if transposed else J

    def rows(self, sel) -> "SpatialFactor":
        _check_sample_selection(sel)
        if not self.per_sample:
            return self
        op = self.op.rows(sel) if self.op.batch is not None else self.op
        return SpatialFactor(op, None if self.d is None else self.d[sel], self._anchor)

    def norm_bound(self):
        """``max|d| · bound(L)`` ≥ ‖J‖₂: ``(B,)`` per sample, else 0-d."""
        xp, b = self.xp, self.op.norm_bound()
        if self.d is None:
            return xp.full((self.batch,) if self.per_sample else (), b, dtype=self.dtype)
        return xp.abs(self.d).reshape(self.batch, -1).max(axis=1) * b

    def singular_values(self):
        """Exact singular values, descending (an SVD of ``dense()``): tests and tiny layers only."""
        return _svd(self.dense())

    def spectral_norm(self, seed: int = 0):
        """``‖J‖₂`` per sample ``(B,)`` (0-d when shared) by batched Lanczos on ``JᵀJ``: a few dozen
        JVP/VJP pairs, nothing dense. Returns a host float64 array."""
        P = self.batch or 1
        if self.per_sample:
            matvec = lambda v, sel: (lambda F: F.vjp(F.jvp(v)))(self.rows(sel))
        else:
            matvec = lambda v, sel: self.vjp(self.jvp(v))
        lam = top_eigenvalues(matvec, P, self.h_in, xp=self.xp, dtype=self.dtype, seed=seed)
        s = np.sqrt(np.maximum(lam, 0.0))
        return s if self.per_sample else s[0]

