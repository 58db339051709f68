"""Structured Jacobian factors beside ``LayerJacobian`` (a residual block's:
``jacgrad.algebra.residual_factor``): ``DiagonalFactor``, the ``diag(d)`` of an elementwise map
``y = φ(h)`` of its own (``jacgrad.nn.layers.Activation``, ``d = φ'(h)``: no parameters, every
product one elementwise multiplication), and a normalisation ``diag(γ/σ)·(I − 11ᵀ/n − x̂x̂ᵀ/n)``
(LayerNorm) or ``diag(γ/r)·(I − x̂x̂ᵀ/n)`` (RMSNorm). Neither is ever formed as a dense matrix in
``vjp``/``jvp``/the row actions.

Every factor offers the protocol ``Chain`` reads: ``vjp``, ``jvp`` (rows ``(B, n)``, or
``(N, n)`` when shared), ``jvp_stack``/``vjp_stack`` (``(…, r, n)`` stacks, for
``Chain.jacobian``), ``dense``, ``rows``, ``norm_bound``, ``singular_values``, ``row_cost``
(multiply-adds per row, for the plan), ``h_in``/``h_out``/``batch``/``per_sample``/``dtype``/
``xp``/``anchor``.

    >>> import numpy as np, jacgrad as jg
    >>> from jacgrad.algebra.factors import NormFactor
    >>> x = np.array([[1.0, 2.0, 4.0]]); xc = x - x.mean(1, keepdims=True)
    >>> inv = 1 / np.sqrt((xc ** 2).mean(1))
    >>> F = NormFactor(np.ones(3), inv, xc * inv[:, None])
    >>> np.round(F.singular_values() * np.sqrt((xc ** 2).mean()), 12)   # n-2 ones, two zeros
    array([[1., 0., 0.]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cuda import hostpool, norm_kernels
from ..cuda.gemm import matmul
from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from .jacobian import _check_sample_selection
from .spectra import singular_values as _svd

__all__ = ["DiagonalFactor", "FixedNormFactor", "NormFactor"]


def _check_rows(F, a, width: int, what: str):
    a = float_array(a, what, get_xp(a, F.anchor))
    if a.ndim not in (1, 2) or a.shape[-1] != width:
        raise ValueError(f"{what} has shape {shape_str(a.shape)} but this {type(F).__name__} maps "
                         f"{F.h_in} -> {F.h_out}: needs (N, {width})")
    if F.per_sample and (a.ndim != 2 or a.shape[0] != F.batch):
        raise ValueError(f"{what} has shape {shape_str(a.shape)} but the factor is per sample with "
                         f"B={F.batch}: needs ({F.batch}, {width})")
    return a


class NormFactor:
    """``diag(γ·inv)·P`` with ``P = I − 11ᵀ/n − x̂x̂ᵀ/n`` (``centered``, LayerNorm) or
    ``P = I − x̂x̂ᵀ/n`` (RMSNorm). ``gamma: (n,)``; ``inv = 1/σ`` (``1/r``): ``(B,)`` per sample
    or 0-d shared; ``xhat: (B, n)`` or ``(n,)``. P is symmetric, so ``Jᵀv = P(γ·inv·v)``.
    Products cost O(n) per row: a mean, a dot with x̂ and two scalings."""

    __slots__ = ("gamma", "inv", "xhat", "centered", "batch", "h_in", "h_out")

    def __init__(self, gamma: Any, inv: Any, xhat: Any, centered: bool = True):
        xp = get_xp(gamma, inv, xhat)
        self.gamma = float_array(gamma, "gamma", xp)
        self.xhat = float_array(xhat, "xhat", xp)
        self.inv = float_array(inv, "inv", xp)
        n = self.gamma.shape[0] if self.gamma.ndim == 1 else -1
        if n < 0 or self.xhat.ndim not in (1, 2) or self.xhat.shape[-1] != n:
            raise ValueError(f"gamma {shape_str(self.gamma.shape)} and xhat {shape_str(self.xhat.shape)}: "
                             f"need gamma (n,) and xhat (B, n) or (n,)")
        if self.inv.shape != self.xhat.shape[:-1]:
            raise ValueError(f"inv has shape {shape_str(self.inv.shape)}; needs {shape_str(self.xhat.shape[:-1])}")
        self.centered = bool(centered)
        self.batch = self.xhat.shape[0] if self.xhat.ndim == 2 else None
        self.h_in = self.h_out = n

    @property
    def per_sample(self) -> bool:
        return self.batch is not None

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(self.gamma.dtype, self.xhat.dtype, self.inv.dtype)

    @property
    def xp(self):
        return get_xp(self.xhat)

    @property
    def anchor(self):
        return self.xhat

    @property
    def row_cost(self) -> int:
        """Multiply-adds per row of a product (a dot, a mean, two scalings)."""
        return 4 * self.h_in

    @property
    def dense_cost(self) -> int:
        """Forming ``dense()``: elementwise, like a dense factor's diagonal scaling (0 in the model)."""
        return 0

    @property
    def scale(self):
        """The diagonal ``γ·inv``: ``(B, n)`` or ``(n,)``."""
        return self.gamma * self.inv[..., None]

    def __repr__(self) -> str:
        kind = "LayerNorm" if self.centered else "RMSNorm"
        b = f"B={self.batch}, " if self.per_sample else "shared, "
        return f"NormFactor({kind}, {b}n={self.h_in}, dtype={self.dtype})"

    def _project(self, s, inplace: bool):
        """``P s`` for stacked rows ``s: (…, r, n)`` on NumPy (rows: ``s[..., None, :]``): every row's two sums (``s·x̂`` and,
        centred, ``Σ s``) as one stacked matmul against ``X = [x̂; 1]``, the correction ``(K/n) X``
        as another, subtracted — into ``s`` when ``inplace`` (and shapes allow), else into the
        correction's fresh array. Half the time of the row-by-row expression at (256, 10, 1024)."""
        xp, n = get_xp(s), max(self.h_in, 1)
        xh = self.xhat
        X = xp.stack([xh, xp.ones_like(xh)], axis=-2) if self.centered else xh[..., None, :]
        K = matmul(s, X.swapaxes(-1, -2))
        K /= n
        C = matmul(K, X)
        if inplace and C.shape == s.shape:
            return xp.subtract(s, C, out=s)
        return xp.subtract(s, C, out=C)

    def _fused(self, a, transpose: bool, stack: bool = False, out: Any = None):
        """The product on CuPy rows: one kernel of ``kernels/norm.cu`` (into ``out`` when given), or
        None on NumPy."""
        if get_xp(a, self.xhat) is np:
            return None
        return norm_kernels.project(a, self.xhat, self.gamma, self.inv, self.centered, transpose, stack, out=out)

    def jvp(self, u: Any):
        """``Ju = γ·inv ⊙ P u``: ``u (B, n) -> (B, n)``."""
        u = _check_rows(self, u, self.h_in, "tangent")
        fused = self._fused(u, False)
        if fused is not None:
            return fused
        return self._project(u[..., None, :], inplace=False)[..., 0, :] * self.scale

    def vjp(self, v: Any, out: Any = None, work: Any = None):
        """``Jᵀv = P (γ·inv ⊙ v) = inv·(s − x̂·(s·x̂)/n − mean(s))``, ``s = γ ⊙ v`` (inv is a
        scalar per row, so it commutes with P): ``v (B, n) -> (B, n)``. ``out``: an array of the
        result's shape and dtype to write into (not ``v``); ``work``: scratch ``(s, k, m)`` of
        shapes ``v.shape``, ``v.shape[:-1] + (1,)`` twice — with both, nothing is allocated."""
        v = _check_rows(self, v, self.h_out, "cotangent")
        fused = self._fused(v, True, out=out)  # CuPy: one kernel of kernels/norm.cu
        if fused is not None:
            return fused
        xp, n = get_xp(v), max(self.h_in, 1)
        dt = np.result_type(v.dtype, self.dtype)
        col = v.shape[:-1] + (1,)
        s, k, m = work if work is not None else (xp.empty(v.shape, dt), xp.empty(col, dt), xp.empty(col, dt))
        out = xp.empty(v.shape, dt) if out is None else out
        inv = self.inv[..., None]
        xp.multiply(v, self.gamma, out=s)
        xp.multiply(s, self.xhat, out=out)
        out.sum(axis=-1, keepdims=True, out=k)
        xp.multiply(k, inv, out=k)
        xp.divide(k, n, out=k)                      # inv·(s·x̂)/n
        xp.multiply(self.xhat, k, out=out)
        xp.multiply(s, inv, out=s)                  # inv·s
        xp.subtract(s, out, out=out)
        if self.centered:
            out -= s.mean(axis=-1, keepdims=True, out=m)
        return out

    def jvp_stack(self, a):
        """``J`` on every row of ``a: (…, r, n)`` -> ``(B, r, n)`` (``(r, n)`` when all is shared)."""
        fused = self._fused(a, False, stack=True)
        if fused is not None:
            return fused
        t = self._project(a, inplace=False)  # a fresh array: a is only read
        t *= self.scale[..., None, :]
        return t

    def vjp_stack(self, a):
        """``Jᵀ`` on every row of ``a: (…, r, n)``."""
        fused = self._fused(a, True, stack=True)
        if fused is not None:
            return fused
        return self._project(_multiply(a, self.scale[..., None, :]), inplace=True)

    def param_vjp_stack(self, a, need_input: bool = True):
        """Split at the parameters (``y = γ ⊙ x̂ + β``, at the output): ``([a], Jᵀ a or None)``."""
        return [a], (self.vjp_stack(a) if need_input else None)

    def param_jvp(self, t, leaf_tangent):
        """``leaf_tangent(0, J t)`` (``t`` None: 0): the parameter tangent enters at the output."""
        return leaf_tangent(0, None if t is None else self.jvp(t))

    def dense(self, transposed: bool = False):
        """``(B, n, n)`` or ``(n, n)``; built only on request (tests, tiny chains)."""
        xp, n = self.xp, self.h_in
        P = xp.eye(n, dtype=self.dtype) - self.xhat[..., :, None] * self.xhat[..., None, :] / max(n, 1)
        if self.centered:
            P = P - 1.0 / max(n, 1)
        return P * self.scale[..., None, :] if transposed else self.scale[..., :, None] * P

    def rows(self, sel) -> "NormFactor":
        _check_sample_selection(sel)
        if not self.per_sample:
            return self
        return type(self)(self.gamma, self.inv[sel], self.xhat[sel], self.centered)

    def norm_bound(self):
        """``max|γ|·inv`` ≥ ‖J‖₂ (P's eigenvalues lie in [0, 1] since ‖x̂‖² ≤ n): 0-d or ``(B,)``."""
        xp = self.xp
        g = xp.abs(self.gamma).max() if self.h_in else xp.zeros((), self.dtype)
        return g * self.inv

    def singular_values(self):
        """Exact singular values, descending: ``(B, n)`` or ``(n,)``. When every γ is the same
        ``g``, in closed form: ``|g|·inv`` times P's eigenvalues — 1 (n−2 times for LayerNorm,
        n−1 for RMSNorm), ``1 − ‖x̂‖²/n`` and, for LayerNorm, 0 (the direction 1); with eps = 0,
        ``‖x̂‖² = n`` and LayerNorm has n−2 values ``|g|/σ`` and two zeros. Else an SVD."""
        xp, n = self.xp, self.h_in
        ones = 2 if self.centered else 1
        if n <= ones or not bool((self.gamma == self.gamma[0]).all()):
            return _svd(self.dense())
        g = xp.abs(self.gamma[0]) * self.inv
        low = xp.clip(1.0 - (self.xhat * self.xhat).sum(axis=-1) / n, 0.0, 1.0)
        parts = [xp.ones(self.inv.shape + (n - ones,), dtype=self.dtype), low[..., None]]
        if self.centered:
            parts.append(xp.zeros(self.inv.shape + (1,), dtype=self.dtype))
        return xp.concatenate(parts, axis=-1) * g[..., None]


class FixedNormFactor(NormFactor):
    """A ``NormFactor`` whose ``γ`` is a constant (a norm without parameters: torch's
    ``elementwise_affine=False``): no split at parameters, so the sweeps pass through it as
    through an activation's factor (``per_sample.has_leaves`` is False)."""

    __slots__ = ()

    @property
    def param_vjp_stack(self):
        raise AttributeError("param_vjp_stack: a norm without parameters has no leaf")

    @property
    def param_jvp(self):
        raise AttributeError("param_jvp: a norm without parameters has no leaf")


class DiagonalFactor:
    """``diag(d)`` with ``d: (B, n)`` per sample or ``(n,)`` shared (kept by reference). The products
    read it only through ``vjp``/``jvp`` and the stacked ``vjp_stack``/``jvp_stack``
    (``per_sample.output_partials``, ``curvature``: no ``param_vjp_stack``): O(n) per row.

        >>> F = DiagonalFactor(np.array([[1.0, -2.0]]))
        >>> F.vjp(np.ones((1, 2))), F.singular_values(), F.dense().shape
        (array([[ 1., -2.]]), array([[2., 1.]]), (1, 2, 2))
    """

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


def _multiply(a, b):
    """``a * b`` (broadcast), on NumPy into a block of ``hostpool`` (see ``_gemm._host_matmul``)."""
    if get_xp(a) is not np:
        return a * b
    dt = np.result_type(a, b)
    return np.multiply(a, b, out=hostpool.empty(np.broadcast_shapes(np.shape(a), np.shape(b)), dt))
