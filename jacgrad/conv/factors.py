"""The Jacobian factors of the convolutional family: ``diag(d) · L`` with ``L`` a linear map on
``(C, H, W)`` images, never formed as a matrix.

``L`` is one of the maps of ``conv.ops`` (re-exported here): a convolution ``C_W``, an average
pool, a max pool's selection (the argmax kept per sample), a global mean, a per-channel scaling
(eval BatchNorm) or a reshape (Flatten). ``d`` (``(B, C_out, H_out, W_out)`` per sample, or None
for 1) is the activation's ``φ'(h)``.

A ``SpatialFactor`` offers the protocol ``Chain`` reads (``algebra.factors``): rows are the images
flattened C-major, ``u: (B, C·H·W)``; ``vjp``, ``jvp``, ``jvp_stack``/``vjp_stack`` on
``(…, r, n)`` stacks, ``dense`` (tests and tiny layers only), ``rows``, ``norm_bound``,
``singular_values``, ``spectral_norm`` (batched Lanczos on ``JᵀJ``, ``algebra.lanczos``), ``row_cost``,
``dense_cost``, ``h_in``/``h_out``/``batch``/``per_sample``/``dtype``/``xp``/``anchor``.

    >>> import numpy as np
    >>> from jacgrad.conv.im2col import Geometry
    >>> geo = Geometry.make("Conv2d", (1, 3, 3), (1, 2, 2), (1, 1), 0, (1, 1))
    >>> F = SpatialFactor(ConvOp(np.ones((1, 1, 4)), geo, 1))
    >>> F.jvp(np.arange(9.0)[None]).tolist()          # 2×2 box sums of [[0,1,2],[3,4,5],[6,7,8]]
    [[8.0, 12.0, 20.0, 24.0]]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..algebra.lanczos import top_eigenvalues
from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from ..algebra.jacobian import _check_sample_selection
from ..algebra.spectra import singular_values as _svd
from .ops import AvgPoolOp, ChannelScaleOp, ConvOp, MaxPoolOp, MeanOp, ReshapeOp  # the maps L, re-exported

__all__ = ["AvgPoolOp", "ChannelScaleOp", "ConvOp", "MaxPoolOp", "MeanOp", "ReshapeOp", "SpatialFactor"]


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

