"""``ResidualFactor``: the Jacobian of a residual block ``z + s·f(z)``, ``I + s·J_inner``, or with a
projection shortcut ``p(z) + s·f(z)``, ``J_p + s·J_inner``: products run through the chains'
factors, and nothing dense is formed in ``vjp``/``jvp``/the row actions. It offers the factor
protocol ``Chain`` reads (``jacgrad.algebra.factors``).

    >>> import numpy as np, jacgrad as jg
    >>> J = jg.LayerJacobian(np.ones((1, 2)), np.eye(2))
    >>> ResidualFactor(jg.Chain([J]), 0.5).vjp(np.array([[1.0, 2.0]]))
    array([[1.5, 3. ]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.backend import get_xp
from .bracketing import row_cost, stack_jvp, stack_vjp
from .chain import Chain, _anchor
from .factors import _check_rows, _multiply
from .jacobian import _check_sample_selection
from .spectra import singular_values as _svd

__all__ = ["ResidualFactor"]


class ResidualFactor:
    """``I + s·J_inner`` for a residual block ``z + s·f(z)``, ``inner``: the ``Chain`` of ``f``
    (``n -> n``); with ``shortcut`` (the ``Chain`` of a projection ``p``, ``n -> m`` as ``f``),
    ``J_p + s·J_inner`` for ``p(z) + s·f(z)``. Products run through the chains' factors; nothing
    dense is formed. The parameter-space sweeps open both (``per_sample.inner_factors``,
    ``shortcut_factors``): the branch's leaves first, then the shortcut's."""

    __slots__ = ("inner", "scale_", "shortcut", "batch", "h_in", "h_out")

    def __init__(self, inner: Chain, scale: float = 1.0, shortcut: Chain | None = None):
        if not isinstance(inner, Chain):
            inner = Chain(inner)
        if shortcut is not None and not isinstance(shortcut, Chain):
            shortcut = Chain(shortcut)
        if shortcut is None and inner.n_in != inner.n_out:
            raise ValueError(f"a residual factor needs an inner chain n -> n; it maps {inner.n_in} -> {inner.n_out} "
                             f"(a block that changes the shape needs a shortcut chain)")
        if shortcut is not None and (shortcut.n_in, shortcut.n_out) != (inner.n_in, inner.n_out):
            raise ValueError(f"a residual factor's shortcut maps {shortcut.n_in} -> {shortcut.n_out} but its inner "
                             f"chain {inner.n_in} -> {inner.n_out}: they must agree")
        if shortcut is not None and None not in (shortcut.batch, inner.batch) and shortcut.batch != inner.batch:
            raise ValueError(f"a residual factor's shortcut has B={shortcut.batch} but its inner chain B={inner.batch}")
        self.inner, self.scale_, self.shortcut = inner, float(scale), shortcut
        self.batch = inner.batch if inner.batch is not None or shortcut is None else shortcut.batch
        self.h_in, self.h_out = inner.n_in, inner.n_out

    @property
    def scale(self) -> float:
        return self.scale_

    @property
    def per_sample(self) -> bool:
        return self.batch is not None

    @property
    def dtype(self) -> np.dtype:
        return self.inner.dtype

    @property
    def xp(self):
        return self.inner.xp

    @property
    def anchor(self):
        return _anchor(self.inner.factors[0])

    @property
    def row_cost(self) -> int:
        """Multiply-adds per row: the inner factors', the shortcut's (the identity's add without one)."""
        short = self.h_out if self.shortcut is None else sum(row_cost(J) for J in self.shortcut.factors)
        return short + sum(row_cost(J) for J in self.inner.factors)

    @property
    def dense_cost(self) -> int:
        """Forming ``dense()``: the inner chain's whole Jacobian (its own plan, B counted), and the shortcut's."""
        return self.inner.jacobian_cost("auto") + (0 if self.shortcut is None else self.shortcut.jacobian_cost("auto"))

    def __repr__(self) -> str:
        short = "I" if self.shortcut is None else repr(self.shortcut)
        return f"ResidualFactor({short} + {self.scale_:g}·{self.inner!r})"

    def jvp(self, u: Any):
        """``J_p u + s·J_inner u`` (``J_p = I`` without a shortcut): ``(B, n) -> (B, m)``."""
        u = _check_rows(self, u, self.h_in, "tangent")
        skip = u if self.shortcut is None else self.shortcut.jvp(u)
        return skip + self.scale_ * self.inner.jvp(u)

    def vjp(self, v: Any):
        """``J_pᵀ v + s·J_innerᵀ v``: ``(B, m) -> (B, n)``."""
        v = _check_rows(self, v, self.h_out, "cotangent")
        skip = v if self.shortcut is None else self.shortcut.vjp(v)
        return skip + self.scale_ * self.inner.vjp(v)

    def _stack(self, a, step, order):
        """``J_p a + s·J_inner a`` (``step``, ``order``: forward or transposed) on stacked rows; ``a`` only read."""
        t, skip = _multiply(a, self.scale_), a
        for J in order(self.inner.factors):
            t = step(J, t)
        for J in order(self.shortcut.factors if self.shortcut is not None else ()):
            skip = step(J, skip)
        return _add_into(t, skip)

    def jvp_stack(self, a):
        """On every row of ``a: (…, r, n)``; ``a`` is only read."""
        return self._stack(a, stack_jvp, list)

    def vjp_stack(self, a):
        """``Jᵀ`` on every row of ``a: (…, r, m)``; ``a`` is only read."""
        return self._stack(a, stack_vjp, reversed)

    def dense(self, transposed: bool = False):
        J = self.scale_ * self.inner.jacobian()
        J = J + (self.xp.eye(self.h_in, dtype=self.dtype) if self.shortcut is None else self.shortcut.jacobian())
        return J.swapaxes(-1, -2) if transposed else J

    def rows(self, sel) -> "ResidualFactor":
        _check_sample_selection(sel)
        if not self.per_sample:
            return self
        short = None if self.shortcut is None else self.shortcut.rows(sel)
        return ResidualFactor(self.inner.rows(sel), self.scale_, short)

    def norm_bound(self):
        """``bound(J_p) + |s|·Π(inner bounds)`` ≥ ‖J_p + s·J_inner‖₂ (J_p = I: 1): 0-d or ``(B,)``."""
        skip = 1.0 if self.shortcut is None else self.shortcut.norm_bound()
        return skip + abs(self.scale_) * self.inner.norm_bound()

    def singular_values(self):
        """Exact singular values (an SVD of ``dense()``), descending."""
        return _svd(self.dense())


def _add_into(t, a):
    """``t + a`` written into ``t`` — a stack the residual's own product made (never the caller's
    ``a``) — when ``a`` broadcasts into its shape; else a new array."""
    if np.broadcast_shapes(t.shape, a.shape) == t.shape and np.result_type(t.dtype, a.dtype) == t.dtype:
        return get_xp(t, a).add(t, a, out=t)
    return t + a
