"""``TokenAxisFactor``: the Jacobian of a layer that acts on the token axis alone, the same map for
every feature — a class token prepended, a token selected, the mean over the tokens — and
``ImageTokensFactor``: the transpose of an image ``(C, H·W)`` into tokens ``(H·W, C)``.

Per sample the token-axis maps are ``M ⊗ I_d`` with a fixed ``M: (T_out, T_in)``:

    ``"prepend"``  M = [0; I_T]  (T+1, T)   ``y = [c; x]``: and a leaf ``c: (d,)`` at row 0
    ``"select"``   M = e_iᵀ      (1, T)     ``y = x[:, i]``   (the token axis dropped)
    ``"mean"``     M = 1ᵀ/T      (1, T)     ``y = x.mean(1)`` (the token axis dropped)

Products never form M: a copy, a slice, a broadcast. ``tokens`` is the input's T; ``h_in = h_out = d``
per token. Rows are ``(B, T, d)`` on a token side and ``(B, d)`` where the token axis is dropped;
stacks put the R rows after B. ``dense()`` is each sample's whole Jacobian, ``(B, T_out·d, T_in·d)``.

    >>> import numpy as np
    >>> F = TokenAxisFactor("mean", 2, 3, 4, np.zeros(1))
    >>> F.vjp(np.ones((2, 4)))[0, :, 0], F.dense().shape
    (array([0.33333333, 0.33333333, 0.33333333]), (2, 4, 12))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.backend import get_xp
from ..algebra.jacobian import _check_sample_selection

__all__ = ["FlatRows", "ImageTokensFactor", "PrependFactor", "TokenAxisFactor"]


class _Shapes:
    """What every factor here shares: dtype and device from ``anchor``, shape checks that name the factor."""

    per_sample = property(lambda self: True)
    dtype = property(lambda self: self.anchor.dtype)
    xp = property(lambda self: get_xp(self.anchor))
    dense_cost = property(lambda self: 0)

    def _check(self, a, lead: tuple, stack: bool, what: str):
        want = (self.batch,) + (("R",) if stack else ()) + lead
        got = tuple(a.shape)
        if len(got) != len(want) or any(w != "R" and g != w for g, w in zip(got, want)):
            raise ValueError(f"{what} has shape {got} but {self!r} needs ({', '.join(map(str, want))})")
        return a

    def _dense_from_vjp(self, transposed: bool):
        """``(B, n_out, n_in)`` from ``Jᵀ`` on the identity: tiny layers and tests only."""
        xp, n_out = self.xp, self.n_out_flat
        eye = xp.broadcast_to(xp.eye(n_out, dtype=self.dtype), (self.batch, n_out, n_out))
        J = self.vjp_stack(eye.reshape((self.batch, n_out) + self.out_lead))  # row k: Jᵀ e_k, the k-th row of J
        J = J.reshape(self.batch, n_out, -1)
        return xp.ascontiguousarray(J.swapaxes(1, 2)) if transposed else J

    def norm_bound(self):
        return self.xp.full(self.batch, self.bound, dtype=self.dtype)

    def flat_rows(self) -> "FlatRows":
        """This factor on each sample's flattened rows (``Chain.flat_tokens`` of a chain that
        changes its token axis)."""
        return FlatRows(self)


class FlatRows:
    """A factor of this module on flat rows ``(B, prod(in_lead)) -> (B, prod(out_lead))``, stacks
    ``(B, R, ·)`` (or ``(R, ·)``, the same rows for every sample): what ``Chain.jacobian`` brackets."""

    __slots__ = ("factor", "batch", "h_in", "h_out")

    def __init__(self, factor):
        self.factor, self.batch = factor, factor.batch
        self.h_in, self.h_out = int(np.prod(factor.in_lead)), int(np.prod(factor.out_lead))

    per_sample = property(lambda self: True)
    dtype = property(lambda self: self.factor.dtype)
    xp = property(lambda self: self.factor.xp)
    anchor = property(lambda self: self.factor.anchor)
    row_cost = property(lambda self: self.factor.row_cost)
    dense_cost = property(lambda self: self.factor.dense_cost)

    def __repr__(self) -> str:
        return f"FlatRows({self.factor!r})"

    def _shaped(self, a, lead: tuple, stack: bool):
        if stack and a.ndim == 2:
            a = self.xp.broadcast_to(a[None], (self.batch,) + a.shape)
        return a.reshape(a.shape[:-1] + tuple(lead))

    def _flat(self, r, stack: bool):
        return r.reshape(r.shape[:2 if stack else 1] + (-1,))

    def vjp(self, v):
        return self._flat(self.factor.vjp(self._shaped(v, self.factor.out_lead, False)), False)

    def jvp(self, u):
        return self._flat(self.factor.jvp(self._shaped(u, self.factor.in_lead, False)), False)

    def vjp_stack(self, A):
        return self._flat(self.factor.vjp_stack(self._shaped(A, self.factor.out_lead, True)), True)

    def jvp_stack(self, A):
        return self._flat(self.factor.jvp_stack(self._shaped(A, self.factor.in_lead, True)), True)

    def dense(self, transposed: bool = False):
        return self.factor.dense(transposed)

    def rows(self, sel) -> "FlatRows":
        return FlatRows(self.factor.rows(sel))

    def norm_bound(self):
        return self.factor.norm_bound()


class TokenAxisFactor(_Shapes):
    """``M ⊗ I_d`` per sample (module text); ``mode`` one of prepend, select, mean; ``index`` the
    selected token (select); ``anchor`` an array of the layer (dtype, device). Without parameters
    (a class token's factor, ``PrependFactor``, splits at its leaf)."""

    def __init__(self, mode: str, batch: int, tokens: int, width: int, anchor: Any, index: int = 0):
        self.mode, self.batch, self.tokens, self.index, self.anchor = mode, int(batch), int(tokens), int(index), anchor
        self.h_in = self.h_out = int(width)
        T_out = {"prepend": self.tokens + 1}.get(mode)
        self.in_lead, self.out_lead = (self.tokens, self.h_in), ((T_out, self.h_out) if T_out else (self.h_out,))
        self.n_out_flat = (T_out or 1) * self.h_out
        self.bound = 1.0 if mode != "mean" else self.tokens ** -0.5  # ‖M‖₂

    row_cost = property(lambda self: self.tokens * self.h_in)

    def __repr__(self) -> str:
        return f"TokenAxisFactor({self.mode}, B={self.batch}, T={self.tokens}, d={self.h_in})"

    def _apply(self, u, stacked: bool):
        """``J`` on ``u: (B, [R,] T, d)``."""
        xp, ax = self.xp, 2 if stacked else 1
        if self.mode == "select":
            return xp.ascontiguousarray(u[(slice(None),) * ax + (self.index,)])
        if self.mode == "mean":
            return u.mean(axis=ax)
        y = xp.zeros(u.shape[:ax] + (self.tokens + 1, self.h_out), dtype=u.dtype)
        y[(slice(None),) * ax + (slice(1, None),)] = u
        return y

    def _adjoint(self, v, stacked: bool):
        """``Jᵀ`` on ``v: (B, [R,] *out)``."""
        xp, ax = self.xp, 2 if stacked else 1
        if self.mode == "prepend":
            return xp.ascontiguousarray(v[(slice(None),) * ax + (slice(1, None),)])
        shape = v.shape[:ax] + (self.tokens, self.h_in)
        if self.mode == "mean":
            return xp.ascontiguousarray(xp.broadcast_to(xp.expand_dims(v / self.tokens, ax), shape))
        out = xp.zeros(shape, dtype=v.dtype)
        out[(slice(None),) * ax + (self.index,)] = v
        return out

    def jvp(self, u):
        """``(B, T, d) -> (B, *out)``."""
        return self._apply(self._check(u, self.in_lead, False, "tangent"), False)

    def vjp(self, v):
        """``(B, *out) -> (B, T, d)``."""
        return self._adjoint(self._check(v, self.out_lead, False, "cotangent"), False)

    def jvp_stack(self, A):
        """``J`` on every row of ``A: (B, R, T, d)``."""
        return self._apply(self._check(A, self.in_lead, True, "tangent stack"), True)

    def vjp_stack(self, A):
        """``Jᵀ`` on every row of ``A: (B, R, *out)``."""
        return self._adjoint(self._check(A, self.out_lead, True, "cotangent stack"), True)

    def dense(self, transposed: bool = False):
        return self._dense_from_vjp(transposed)

    def rows(self, sel) -> "TokenAxisFactor":
        return type(self)(self.mode, _count(self.batch, sel), self.tokens, self.h_in, self.anchor, self.index)


class PrependFactor(TokenAxisFactor):
    """The ``"prepend"`` factor of a class token, split at its leaf (the token ``c: (d,)``, an
    ``ElementwiseLeaf`` with ``a = 1``: ``∇c_i = δ_i,0``)."""

    n_leaves = 1

    def __init__(self, batch: int, tokens: int, width: int, anchor: Any, index: int = 0):
        super().__init__("prepend", batch, tokens, width, anchor)

    def rows(self, sel) -> "PrependFactor":
        return PrependFactor(_count(self.batch, sel), self.tokens, self.h_in, self.anchor)

    def param_vjp_stack(self, A, need_input: bool = True):
        """ ``([A[:, :, 0]], A[:, :, 1:])``: row 0 is the class token's ``G: (B, R, d)``."""
        self._check(A, self.out_lead, True, "cotangent stack")
        return [self.xp.ascontiguousarray(A[:, :, 0])], (self._adjoint(A, True) if need_input else None)

    def param_jvp(self, t, leaf_tangent):
        """The class token's tangent in row 0, the input tangent ``t`` (None: 0) below."""
        y = self._apply(self._check(t, self.in_lead, False, "tangent"), False) if t is not None else \
            self.xp.zeros((self.batch, self.tokens + 1, self.h_out), dtype=self.dtype)
        y[:, 0] = leaf_tangent(0, None)
        return y


class ImageTokensFactor(_Shapes):
    """``(B, C·S) -> (B, S, C)``: an image's channels at each of its ``S`` positions (``H·W``) as
    tokens, ``flatten(2).transpose(1, 2)``. Its input rows are flat ``(B, C·S)``, as a convolution's
    factor gives them; ``tokens = S``, ``h_in = C·S``, ``h_out = C`` per token."""

    def __init__(self, batch: int, channels: int, positions: int, anchor: Any):
        self.batch, self.C, self.tokens, self.anchor = int(batch), int(channels), int(positions), anchor
        self.h_in, self.h_out = self.C * self.tokens, self.C
        self.in_lead, self.out_lead = (self.h_in,), (self.tokens, self.C)
        self.n_out_flat, self.bound = self.h_in, 1.0

    row_cost = property(lambda self: self.h_in)

    def __repr__(self) -> str:
        return f"ImageTokensFactor(B={self.batch}, C={self.C}, T={self.tokens})"

    def _apply(self, u):
        lead = u.shape[:-1]
        return self.xp.ascontiguousarray(u.reshape(lead + (self.C, self.tokens)).swapaxes(-1, -2))

    def _adjoint(self, v):
        lead = v.shape[:-2]
        return self.xp.ascontiguousarray(v.swapaxes(-1, -2)).reshape(lead + (self.h_in,))

    def jvp(self, u):
        """``(B, C·S) -> (B, S, C)``."""
        return self._apply(self._check(u, self.in_lead, False, "tangent"))

    def vjp(self, v):
        """``(B, S, C) -> (B, C·S)``."""
        return self._adjoint(self._check(v, self.out_lead, False, "cotangent"))

    def jvp_stack(self, A):
        return self._apply(self._check(A, self.in_lead, True, "tangent stack"))

    def vjp_stack(self, A):
        return self._adjoint(self._check(A, self.out_lead, True, "cotangent stack"))

    def dense(self, transposed: bool = False):
        """``(B, S·C, C·S)``: a permutation per sample."""
        return self._dense_from_vjp(transposed)

    def rows(self, sel) -> "ImageTokensFactor":
        return ImageTokensFactor(_count(self.batch, sel), self.C, self.tokens, self.anchor)


def _count(batch: int, sel) -> int:
    """How many samples ``sel`` (a slice or 1-D index array, checked) keeps of ``batch``."""
    _check_sample_selection(sel)
    return len(np.arange(batch)[sel])
