"""``DiagonalFactor``: the Jacobian ``diag(d)`` of an elementwise map ``y = φ(h)`` of its own
(``jacgrad.nn.layers.Activation``: an activation after a norm or a residual join), ``d = φ'(h)``.

It has no parameters, so the products read it only through ``vjp``/``jvp`` and the stacked
``vjp_stack``/``jvp_stack`` (``per_sample.output_partials``, ``curvature``: no
``param_vjp_stack``). Every product is one elementwise multiplication: O(n) per row.

    >>> import numpy as np
    >>> F = DiagonalFactor(np.array([[1.0, -2.0]]))
    >>> F.vjp(np.ones((1, 2))), F.singular_values(), F.dense().shape
    (array([[ 1., -2.]]), array([[2., 1.]]), (1, 2, 2))
"""

from __future__ import annotations

from typing import Any

from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from .factors import _check_rows
from .jacobian import _check_sample_selection

__all__ = ["DiagonalFactor"]


class DiagonalFactor:
    """``diag(d)`` with ``d: (B, n)`` per sample or ``(n,)`` shared (kept by reference)."""

    __slots__ = ("d", "batch", "h_in", "h_out")

    def __init__(self, d: Any):
        d = float_array(d, "d", get_xp(d))
        if d.ndim not in (1, 2):
            raise ValueError(f"DiagonalFactor: d must be (n,) or (B, n), got shape {shape_str(d.shape)}")
        self.d = d
        self.batch = d.shape[0] if d.ndim == 2 else None
        self.h_in = self.h_out = d.shape[-1]

    per_sample = property(lambda self: self.batch is not None)
    dtype = property(lambda self: self.d.dtype)
    xp = property(lambda self: get_xp(self.d))
    anchor = property(lambda self: self.d, doc="an array of the factor (its device is the factor's)")
    row_cost = property(lambda self: self.h_in, doc="multiply-adds per row: one scaling")
    dense_cost = property(lambda self: 0, doc="forming ``dense()``: elementwise (0 in the model)")

    def __repr__(self) -> str:
        b = f"B={self.batch}, " if self.per_sample else "shared, "
        return f"DiagonalFactor({b}n={self.h_in}, dtype={self.dtype})"

    def jvp(self, u: Any):
        """``d ⊙ u``: ``(B, n) -> (B, n)``."""
        return _check_rows(self, u, self.h_in, "tangent") * self.d

    def vjp(self, v: Any):
        """``d ⊙ v`` (the factor is symmetric): ``(B, n) -> (B, n)``."""
        return _check_rows(self, v, self.h_out, "cotangent") * self.d

    def jvp_stack(self, a):
        """On every row of ``a: (…, r, n)`` -> ``(B, r, n)`` (``(r, n)`` when all is shared); ``a`` only read."""
        return a * self.d[..., None, :]

    vjp_stack = jvp_stack

    def dense(self, transposed: bool = False):
        """``(B, n, n)`` or ``(n, n)`` (symmetric: ``transposed`` changes nothing); built only on request."""
        eye = self.xp.eye(self.h_in, dtype=self.dtype)
        return self.d[..., :, None] * eye

    def rows(self, sel) -> "DiagonalFactor":
        _check_sample_selection(sel)
        return DiagonalFactor(self.d[sel]) if self.per_sample else self

    def norm_bound(self):
        """``max|d|`` = ‖diag(d)‖₂ exactly: 0-d or ``(B,)``."""
        if self.h_in == 0:
            return self.xp.zeros(self.d.shape[:-1], dtype=self.dtype)
        return self.xp.abs(self.d).max(axis=-1)

    spectral_norm = norm_bound

    def singular_values(self):
        """``|d|`` sorted, descending: ``(B, n)`` or ``(n,)``."""
        s = self.xp.sort(self.xp.abs(self.d), axis=-1)
        return self.xp.ascontiguousarray(s[..., ::-1])
