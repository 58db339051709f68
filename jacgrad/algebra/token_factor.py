"""``TokenFactor``: the Jacobian of a layer acting per token on ``(B, T, n)``, from a factor of its rows.

A per-token layer (Dense, LayerNorm, RMSNorm on ``(B, T, d)``) computes on the ``B·T`` rows of its
input; its factor on those rows (a ``LayerJacobian`` or ``NormFactor`` with ``B·T`` samples) is
the per-token Jacobian. Per sample the Jacobian is block-diagonal over the tokens; this wrapper
reshapes ``(B, T, n) ↔ (B·T, n)`` (and cotangent stacks ``(B, R, T, n) ↔ (B·T, R, n)``) around the
row factor's GEMMs and never forms the ``(T·n_out, T·n_in)`` blocks: its ``dense()`` and spectra
refuse with a message. ``FlatTokens`` is the same factor on each sample's flattened tokens
``(B, T·n)``: ``Chain.jacobian`` of a token chain brackets those, and builds the per-sample
``(T·n_out, T·n_in)`` Jacobian. T = 1 inputs given as ``(B, d)`` keep the row factor itself.

    >>> import numpy as np, jacgrad as jg
    >>> F = TokenFactor(jg.LayerJacobian(np.ones((6, 2)), np.ones((3, 2))), (2, 3))
    >>> F.vjp(np.ones((2, 3, 2))).shape, F.h_in, F.batch
    ((2, 3, 3), 3, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.backend import get_xp
from ..cuda.gemm import matmul

__all__ = ["TokenFactor", "FlatTokens", "DEFAULT_MAX_MEMORY", "token_jacobian_bytes"]

# The largest per-sample token Jacobian computation a Chain runs without being asked (bytes; None: no limit).
DEFAULT_MAX_MEMORY = 1 << 30


class TokenFactor:
    """The per-token factor of a ``(B, T, ·)`` batch; ``inner``: the factor of its ``B·T`` rows
    (row ``b·T + t`` is token t of sample b); ``lead = (B, T)``."""

    __slots__ = ("inner", "batch", "tokens", "h_in", "h_out")

    def __init__(self, inner: Any, lead: tuple):
        B, T = (int(n) for n in lead)
        if getattr(inner, "batch", None) != B * T:
            raise ValueError(f"TokenFactor: the row factor has batch {getattr(inner, 'batch', None)} but "
                             f"B={B} samples of T={T} tokens need B·T={B * T} rows")
        self.inner, self.batch, self.tokens = inner, B, T
        self.h_in, self.h_out = inner.h_in, inner.h_out

    per_sample = property(lambda self: True)
    dtype = property(lambda self: self.inner.dtype)
    xp = property(lambda self: get_xp(self.anchor))
    anchor = property(lambda self: self.inner.anchor if hasattr(self.inner, "anchor") else self.inner.W,
                      doc="an array of the row factor's (its device is the factor's)")
    row_cost = property(lambda self: self.tokens * _cost(self.inner))
    dense_cost = property(lambda self: self.tokens * self.tokens * self.h_in * self.h_out)

    def __repr__(self) -> str:
        return f"TokenFactor(B={self.batch}, T={self.tokens}, {self.inner!r})"

    # ------------------------------------------------------------------ reshapes
    def _rows(self, a):
        """``(B, T, n) -> (B·T, n)``."""
        return a.reshape(self.batch * self.tokens, a.shape[-1])

    def _back(self, r):
        return r.reshape(self.batch, self.tokens, r.shape[-1])

    def _stack_rows(self, A):
        """``(B, R, T, n) -> (B·T, R, n)`` (a copy: the token axis moves before the rows)."""
        B, R, T, n = A.shape
        return get_xp(A).ascontiguousarray(A.transpose(0, 2, 1, 3)).reshape(B * T, R, n)

    def _stack_back(self, S):
        BT, R, n = S.shape
        return get_xp(S).ascontiguousarray(S.reshape(self.batch, self.tokens, R, n).transpose(0, 2, 1, 3))

    def _check(self, a, width: int, what: str, stack: bool):
        want = (self.batch, "R", self.tokens, width) if stack else (self.batch, self.tokens, width)
        got = tuple(a.shape)
        if len(got) != len(want) or any(w != "R" and g != w for g, w in zip(got, want)):
            raise ValueError(f"{what} has shape {got} but this per-token factor needs "
                             f"({', '.join(map(str, want))})")

    # ------------------------------------------------------------------ products
    def vjp(self, v):
        """``(B, T, H_out) -> (B, T, H_in)``, token by token."""
        self._check(v, self.h_out, "cotangent", False)
        return self._back(self.inner.vjp(self._rows(v)))

    def jvp(self, u):
        """``(B, T, H_in) -> (B, T, H_out)``, token by token."""
        self._check(u, self.h_in, "tangent", False)
        return self._back(self.inner.jvp(self._rows(u)))

    def vjp_stack(self, A):
        """``Jᵀ`` on cotangent rows ``A: (B, R, T, H_out) -> (B, R, T, H_in)``."""
        self._check(A, self.h_out, "cotangent stack", True)
        return self._stack_back(_stack_op(self.inner, "vjp", self._stack_rows(A)))

    def jvp_stack(self, A):
        """``J`` on tangent rows ``A: (B, R, T, H_in) -> (B, R, T, H_out)``."""
        self._check(A, self.h_in, "tangent stack", True)
        return self._stack_back(_stack_op(self.inner, "jvp", self._stack_rows(A)))

    @property
    def param_vjp_stack(self):
        """The row factor's split at its parameters on ``(B, R, T, ·)`` stacks (only where it has one)."""
        if not hasattr(self.inner, "param_vjp_stack"):
            raise AttributeError("param_vjp_stack")

        def split(A, need_input: bool = True):
            self._check(A, self.h_out, "cotangent stack", True)
            Gs, A_in = self.inner.param_vjp_stack(self._stack_rows(A), need_input)
            return [self._stack_back(G) for G in Gs], (None if A_in is None else self._stack_back(A_in))
        return split

    @property
    def param_jvp(self):
        """The row factor's forward split on ``(B, T, ·)`` tangents (only where it has one)."""
        if not hasattr(self.inner, "param_jvp"):
            raise AttributeError("param_jvp")

        def forward(t, leaf_tangent):
            def rows(i, base):
                return self._rows(leaf_tangent(i, None if base is None else self._back(base)))
            return self._back(self.inner.param_jvp(None if t is None else self._rows(t), rows))
        return forward

    def rows(self, sel) -> "TokenFactor":
        """The factor of the samples ``sel`` (a slice or 1-D index array of samples)."""
        idx = np.arange(self.batch)[sel]
        token_rows = (idx[:, None] * self.tokens + np.arange(self.tokens)).reshape(-1)
        return TokenFactor(self.inner.rows(token_rows), (len(idx), self.tokens))

    def norm_bound(self):
        """``max_t`` of the row factor's bound (the Jacobian is block-diagonal over tokens): ``(B,)``."""
        return self.inner.norm_bound().reshape(self.batch, self.tokens).max(axis=1)

    def dense(self, transposed: bool = False):
        raise ValueError(f"a per-token factor (B={self.batch}, T={self.tokens}) has no dense form of its own rows; the "
                         f"per-sample (T·{self.h_out}, T·{self.h_in}) Jacobian is FlatTokens(factor).dense() "
                         f"(Chain.jacobian of a token chain)")

    def singular_values(self):
        self.dense()


def _cost(J) -> int:
    return J.row_cost if hasattr(J, "row_cost") else J.h_in * J.h_out


def _stack_op(J, which: str, S):
    """``J``'s product on stacked rows ``S: (N, R, n)``: its own ``*_stack`` where it has one (a
    ``LayerJacobian`` has ``scale_stack`` and its weights)."""
    if hasattr(J, f"{which}_stack"):
        return getattr(J, f"{which}_stack")(S)
    if which == "vjp":
        return matmul(J.scale_stack(S), J.W.T)
    return J.scale_stack(matmul(S, J.W), inplace=True)


class FlatTokens:
    """A per-token factor (``tokens`` = T, widths ``n`` per token: a ``TokenFactor``, an
    ``AttentionFactor``, an ``EmbeddingFactor``) on each sample's flattened tokens: rows
    ``(B, T·n_in) -> (B, T·n_out)``, stacks ``(B, R, T·n)``; ``h_in = T·n_in``, ``h_out = T·n_out``.
    It is what ``Chain.jacobian`` of a token chain brackets: ``dense()`` is the sample's whole
    ``(B, T·n_out, T·n_in)`` Jacobian (block-diagonal over tokens for a ``TokenFactor``, built from
    its row factor's ``(B·T, n_out, n_in)`` blocks; the factor's own for attention, which couples them).

        >>> import numpy as np, jacgrad as jg
        >>> F = FlatTokens(TokenFactor(jg.LayerJacobian(np.ones((6, 2)), np.ones((3, 2))), (2, 3)))
        >>> F.dense().shape, F.jvp(np.ones((2, 9))).shape
        ((2, 6, 9), (2, 6))
    """

    __slots__ = ("factor", "batch", "T", "h_in", "h_out")  # T, not tokens: its rows are flat

    def __init__(self, factor: Any):
        self.factor, self.batch, self.T = factor, factor.batch, factor.tokens
        self.h_in, self.h_out = self.T * factor.h_in, self.T * factor.h_out

    per_sample = property(lambda self: True)
    dtype = property(lambda self: self.factor.dtype)
    xp = property(lambda self: self.factor.xp)
    anchor = property(lambda self: self.factor.anchor)
    row_cost = property(lambda self: self.factor.row_cost, doc="the factor's: its rows are whole samples already")
    dense_cost = property(lambda self: self.factor.dense_cost)

    def __repr__(self) -> str:
        return f"FlatTokens({self.factor!r})"

    def _tokens(self, a, width: int, what: str):
        """``a: (B, T·n)`` or a stack ``(B, R, T·n)`` (``(R, T·n)`` broadcast to every sample) as
        ``(B, [R,] T, n)``."""
        xp, T = self.xp, self.T
        if a.ndim == 2 and a.shape[0] != self.batch and a.shape[-1] == T * width:
            a = xp.broadcast_to(a[None], (self.batch,) + a.shape)
        if a.ndim not in (2, 3) or a.shape[0] != self.batch or a.shape[-1] != T * width:
            raise ValueError(f"{what} has shape {tuple(a.shape)} but this token factor maps B={self.batch} samples of "
                             f"T={T} tokens of width {width}: needs ({self.batch}, [R,] {T * width})")
        return a.reshape(a.shape[:-1] + (T, width))

    def _flat(self, r):
        return r.reshape(r.shape[:-2] + (r.shape[-2] * r.shape[-1],))

    def vjp(self, v):
        """``(B, T·n_out) -> (B, T·n_in)``."""
        return self._flat(self.factor.vjp(self._tokens(v, self.factor.h_out, "cotangent")))

    def jvp(self, u):
        """``(B, T·n_in) -> (B, T·n_out)``."""
        return self._flat(self.factor.jvp(self._tokens(u, self.factor.h_in, "tangent")))

    def vjp_stack(self, A):
        """``Jᵀ`` on every row of ``A: (B, R, T·n_out)`` (or ``(R, T·n_out)``) -> ``(B, R, T·n_in)``."""
        A = self._tokens(A, self.factor.h_out, "cotangent stack")
        if A.ndim == 3:
            raise ValueError("vjp_stack needs a stack (B, R, T·n_out) or (R, T·n_out)")
        return self._flat(self.factor.vjp_stack(A))

    def jvp_stack(self, A):
        """``J`` on every row of ``A: (B, R, T·n_in)`` (or ``(R, T·n_in)``) -> ``(B, R, T·n_out)``."""
        A = self._tokens(A, self.factor.h_in, "tangent stack")
        if A.ndim == 3:
            raise ValueError("jvp_stack needs a stack (B, R, T·n_in) or (R, T·n_in)")
        return self._flat(self.factor.jvp_stack(A))

    def dense(self, transposed: bool = False):
        """``(B, T·n_out, T·n_in)`` (or its transpose)."""
        F = self.factor
        if not isinstance(F, TokenFactor):
            return F.dense(transposed=transposed)
        xp, B, T = self.xp, self.batch, self.T
        D = F.inner.dense(transposed=transposed)  # (B·T, m, n) per row, or (m, n) shared by the rows
        m, n = D.shape[-2:]
        D = xp.broadcast_to(D, (B * T, m, n)).reshape(B, T, m, 1, n)
        eye = xp.eye(T, dtype=D.dtype).reshape(1, T, 1, T, 1)
        return (D * eye).reshape(B, T * m, T * n)  # token t's block on the diagonal, zeros elsewhere

    def rows(self, sel) -> "FlatTokens":
        return FlatTokens(self.factor.rows(sel))

    def norm_bound(self):
        return self.factor.norm_bound()


def token_jacobian_bytes(widths, batch: int, tokens: int, heads: int, itemsize: int) -> int:
    """Bytes of the largest array a token chain's whole Jacobian passes through: a stack of
    ``T·w`` rows of ``T·w`` for the widest layer w, or, inside an attention core, of
    ``(T·w, heads, T, T)`` per sample."""
    w = max(widths)
    return int(itemsize) * int(batch) * tokens * w * tokens * max(w, heads * tokens, 1)
