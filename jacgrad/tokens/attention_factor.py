"""The core of multi-head attention, ``softmax(QKᵀ/√d_h)·V`` per head, and the Jacobian factor of a
whole ``MultiHeadAttention`` layer (in-projections, core, out-projection) as a structured factor.

Shapes, with letters: ``B`` the batch, ``T`` tokens, ``d`` the model width, ``h`` heads of width
``d_h = d/h``. Per head the arrays are ``(B, h, T, d_h)`` (``split_heads``); the attention
weights ``P: (B, h, T, T)``, row ``t`` the distribution of query ``t`` over the keys.

Products of the softmax Jacobian never form it: per row ``J_t = diag(p_t) − p_t p_tᵀ``, so
``J_t s = p_t ⊙ (s − p_t·s)`` — one elementwise product and one row sum for all rows at once.
With ``S = QKᵀ/√d_h`` and ``O = PV``:

    JVP   Ṡ = (Q̇Kᵀ + QK̇ᵀ)/√d_h     Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))      Ȯ = ṖV + PV̇
    VJP   V̄ = PᵀŌ    P̄ = ŌVᵀ    S̄ = P ⊙ (P̄ − rowsum(P ⊙ P̄))    Q̄ = S̄K/√d_h    K̄ = S̄ᵀQ/√d_h

A masked key has ``p = 0``, so nothing flows through it; a query whose keys are all masked has
a zero row of ``P`` (its output is the out-projection's bias), as torch's autograd path gives.

    >>> import numpy as np
    >>> from jacgrad.tokens.attention_factor import attention_weights
    >>> P = attention_weights(np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4)), 0.5)
    >>> P[0, 0]                                  # all-equal scores: uniform rows
    array([[0.5, 0.5],
           [0.5, 0.5]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..algebra.lanczos import top_eigenvalues
from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from ..cuda import softmax_kernels
from ..cuda.gemm import matmul, matmul_into
from ..algebra.jacobian import _check_sample_selection
from ..algebra.spectra import singular_values as _svd

__all__ = ["AttentionFactor", "attention_mask", "attention_weights", "core_jvp", "core_vjp", "merge_heads",
           "split_heads"]


def split_heads(a, heads: int):
    """``(…, T, d) -> (…, h, T, d_h)``: head ``k`` holds features ``k·d_h … (k+1)·d_h − 1`` (torch's split)."""
    *lead, T, d = a.shape
    return a.reshape(*lead, T, heads, d // heads).swapaxes(-2, -3)


def merge_heads(a):
    """``(…, h, T, d_h) -> (…, T, h·d_h)``, the inverse of ``split_heads`` (a contiguous copy)."""
    *lead, h, T, dh = a.shape
    return get_xp(a).ascontiguousarray(a.swapaxes(-2, -3)).reshape(*lead, T, h * dh)


def attention_mask(xp, B: int, T: int, causal: bool, key_padding_mask: Any):
    """The masked (query, key) pairs as a bool array broadcasting against ``(B, h, T, T)``:
    ``(1, 1, T, T)`` (causal only: key ``s > t``), ``(B, 1, 1, T)`` (key padding only),
    ``(B, 1, T, T)`` (both); None when nothing is masked. ``key_padding_mask: (B, T)`` bool,
    True = masked (torch's convention), already checked."""
    mask = None
    if causal:
        mask = xp.triu(xp.ones((T, T), dtype=bool), k=1)[None, None]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        mask = kp if mask is None else xp.logical_or(mask, kp)
    return mask


def attention_weights(Q, K, scale: float, causal: bool = False, key_padding_mask: Any = None, out: Any = None):
    """``P = softmax(QKᵀ·scale)`` over the keys, masked pairs 0 (``causal``: key ``s > t``;
    ``key_padding_mask: (B, T)`` bool, True = masked, already checked); a row whose every key is
    masked is all 0 (no NaN, no warning). ``Q, K: (B, h, T, d_h)``; ``out``: a ``(B, h, T, T)``
    buffer to write into."""
    S = matmul(Q, K.swapaxes(-1, -2)) if out is None else matmul_into(Q, K.swapaxes(-1, -2), out)
    return _softmax_rows(S, scale, causal, key_padding_mask)


def _softmax_rows(S, scale: float, causal: bool, key_padding_mask):
    """``softmax(scale·S)`` over the last axis of ``S: (B, h, T, T)``, masked keys 0, written into ``S``; a
    row whose every score is −inf (every key masked) is all 0. On CuPy one fused row kernel
    (``jacgrad.cuda.softmax_kernels.softmax_rows``: no mask array); on NumPy these lines, its reference."""
    xp = get_xp(S, key_padding_mask)
    if xp is not np:
        return softmax_kernels.softmax_rows(S, scale, causal, key_padding_mask, out=S)
    mask = attention_mask(xp, S.shape[0], S.shape[-1], causal, key_padding_mask)
    S *= scale
    if mask is not None:
        S[...] = xp.where(mask, -xp.inf, S)
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)  # a row of -inf only (every key masked): exp gives zeros, not NaN
    S -= m
    xp.exp(S, out=S)
    s = S.sum(axis=-1, keepdims=True)
    S /= xp.where(s > 0, s, 1.0)
    return S


def _softmax_jvp(P, Sdot):
    """``P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``: every row's ``(diag(p) − ppᵀ)ṡ``, written into ``Ṡ`` (the caller's scratch).
    On CuPy one fused row kernel (``jacgrad.cuda.softmax_kernels``); on NumPy these lines, its reference."""
    if get_xp(P, Sdot) is not np:
        return softmax_kernels.softmax_jvp(P, Sdot, out=Sdot)
    Sdot -= (P * Sdot).sum(axis=-1, keepdims=True)
    Sdot *= P
    return Sdot


def core_jvp(P, Q, K, V, Qdot, Kdot, Vdot, scale: float):
    """``Ȯ`` of ``O = softmax(QKᵀ·scale)V`` for tangents ``Q̇, K̇, V̇`` (head layout, leading axes
    broadcasting against ``P``'s); any tangent may be None (zero)."""
    xp = get_xp(P, Q)
    Sdot = None
    if Qdot is not None:
        Sdot = matmul(Qdot, K.swapaxes(-1, -2))
    if Kdot is not None:
        t = matmul(Q, Kdot.swapaxes(-1, -2))
        Sdot = t if Sdot is None else xp.add(Sdot, t, out=Sdot if Sdot.shape == t.shape else None)
    Odot = None
    if Sdot is not None:
        Sdot *= scale
        Odot = matmul(_softmax_jvp(P, Sdot), V)
    if Vdot is not None:
        t = matmul(P, Vdot)
        Odot = t if Odot is None else Odot + t
    return Odot


def core_vjp(P, Q, K, V, Obar, scale: float):
    """``(Q̄, K̄, V̄)`` of ``O = softmax(QKᵀ·scale)V`` for the cotangent ``Ō`` (head layout, leading
    axes broadcasting against ``P``'s)."""
    Vbar = matmul(P.swapaxes(-1, -2), Obar)
    Sbar = _softmax_jvp(P, matmul(Obar, V.swapaxes(-1, -2)))  # diag(p) − ppᵀ is symmetric
    Sbar *= scale
    return matmul(Sbar, K), matmul(Sbar.swapaxes(-1, -2), Q), Vbar


def _frob(a, axes):
    return get_xp(a).sqrt((a * a).sum(axis=axes))


class AttentionFactor:
    """``∂y/∂x`` of ``y = MHA(x)`` per sample, ``x, y: (T, d)``: the in-projections ``Wq, Wk, Wv: (d, d)``,
    the core (kept ``P, Q, K, V`` of the forward pass, head layout) and the out-projection
    ``Wo: (d, d)``. Nothing of size ``(T·d)²`` is formed by the products.

    As a per-token factor (``token_factor.TokenFactor``): ``h_in = h_out = d``, ``tokens = T``; rows
    ``(B, T, d)``, stacks ``(B, R, T, d)``. The flat layouts ``(B, T·d)`` and ``(B, R, T·d)`` (or a
    shared ``(R, T·d)``) are accepted too; results have the layout of the argument. Split at its
    four parameter leaves (q, k, v, out: ``n_leaves = 4``): ``param_vjp_stack`` gives the cotangents
    at the projections' outputs — the ``Δ`` each leaf pairs with its ``A`` (``x`` for q, k, v; the
    merged heads ``O`` for out) — and ``param_jvp`` adds the leaves' tangents where they act."""

    __slots__ = ("Wq", "Wk", "Wv", "Wo", "P", "Q", "K", "V", "heads", "scale", "T", "d", "batch", "h_in", "h_out")
    n_leaves = 4

    def __init__(self, Wq, Wk, Wv, Wo, P, Q, K, V, scale: float):
        self.Wq, self.Wk, self.Wv, self.Wo = Wq, Wk, Wv, Wo
        self.P, self.Q, self.K, self.V = P, Q, K, V
        self.batch, self.heads, self.T, _ = Q.shape
        self.d = Wq.shape[0]
        self.scale = float(scale)
        self.h_in = self.h_out = self.d

    tokens = property(lambda self: self.T, doc="T, the tokens of every sample")

    per_sample = property(lambda self: True)
    dtype = property(lambda self: np.dtype(self.Wq.dtype))
    xp = property(lambda self: get_xp(self.Wq))
    anchor = property(lambda self: self.Wq)

    @property
    def row_cost(self) -> int:
        """Multiply-adds per row of a product: four ``T×d×d`` projections and four ``T×T×d`` core GEMMs."""
        return 4 * self.T * self.d * (self.d + self.T)

    @property
    def dense_cost(self) -> int:
        """Forming ``dense()``: ``T·d`` rows of a JVP per sample."""
        return self.batch * self.T * self.d * self.row_cost

    def __repr__(self) -> str:
        return f"AttentionFactor(B={self.batch}, T={self.T}, d={self.d}, heads={self.heads}, dtype={self.dtype})"

    # ---------------------------------------------------------------- rows
    def _rows(self, a, what: str, stacked: bool):
        """``a`` as ``(B, [r,] T, d)`` (a stack ``(r, T·d)`` as ``(1, r, T, d)``, shared by every sample)
        and the shape to give the result back in. Layouts: rows ``(B, T·d)`` or ``(B, T, d)``;
        stacks ``(B, r, T·d)``, ``(B, r, T, d)`` or ``(r, T·d)``."""
        xp = get_xp(a, self.Wq)
        a = float_array(a, what, xp)
        B, T, d = self.batch, self.T, self.d
        n = T * d
        flat = a.ndim == (3 if stacked else 2) or (stacked and a.ndim == 2)
        ok = (a.shape[-1] == n) if flat else (a.ndim == (4 if stacked else 3) and a.shape[-2:] == (T, d))
        if ok and not (stacked and a.ndim == 2):
            ok = a.shape[0] == B
        if not ok:
            forms = (f"({B}, r, {n}), ({B}, r, {T}, {d}) or (r, {n})" if stacked else f"({B}, {n}) or ({B}, {T}, {d})")
            raise ValueError(f"{what} has shape {shape_str(a.shape)} but this attention factor is per sample with "
                             f"B={B}, T={T}, d={d} (T·d = {n}): needs {forms}")
        lead = a.shape[:-1] if flat else a.shape[:-2]
        if stacked and a.ndim == 2:
            lead = (1,) + lead
        return a.reshape(lead + (T, d)), a.shape

    def _state(self, stacked: bool):
        """``P, Q, K, V`` with an axis for the stack's rows where ``stacked``."""
        if not stacked:
            return self.P, self.Q, self.K, self.V
        return self.P[:, None], self.Q[:, None], self.K[:, None], self.V[:, None]

    def _jvp(self, u, stacked: bool):
        P, Q, K, V = self._state(stacked)
        h = self.heads
        Od = core_jvp(P, Q, K, V, split_heads(matmul(u, self.Wq), h), split_heads(matmul(u, self.Wk), h),
                      split_heads(matmul(u, self.Wv), h), self.scale)
        return matmul(merge_heads(Od), self.Wo)

    def _vjp_parts(self, v, stacked: bool):
        P, Q, K, V = self._state(stacked)
        Qb, Kb, Vb = core_vjp(P, Q, K, V, split_heads(matmul(v, self.Wo.T), self.heads), self.scale)
        Qb, Kb, Vb = merge_heads(Qb), merge_heads(Kb), merge_heads(Vb)
        x = matmul(Qb, self.Wq.T)
        x += matmul(Kb, self.Wk.T)
        x += matmul(Vb, self.Wv.T)
        return x, (Qb, Kb, Vb, v)

    def jvp(self, u: Any):
        """``J u``: ``u (B, T·d)`` or ``(B, T, d)`` -> the same layout."""
        u, shape = self._rows(u, "tangent", False)
        return self._jvp(u, False).reshape(shape)

    def vjp(self, v: Any):
        """``Jᵀ v``: ``v (B, T·d)`` or ``(B, T, d)`` -> the same layout."""
        v, shape = self._rows(v, "cotangent", False)
        return self._vjp_parts(v, False)[0].reshape(shape)

    def vjp_parts(self, v: Any, stacked: bool = False):
        """``(Jᵀv, (Q̄, K̄, V̄, v))``: the input cotangent and the cotangents at the outputs of the q, k,
        v and out projections, each ``(B, [r,] T, d)`` (heads merged) — the ``Δ`` of the projection
        leaves. ``v: (B, [r,] T, d)`` (``stacked``: with an axis of r rows per sample)."""
        v, _ = self._rows(v, "cotangent", stacked)
        return self._vjp_parts(v, stacked)

    def param_vjp_stack(self, A, need_input: bool = True):
        """The split at the parameters for cotangent rows ``A: (B, R, T, d)``: ``([Q̄, K̄, V̄, A], A_in)``,
        the cotangents at the outputs of the q, k, v, out projections (each ``(B, R, T, d)``) and the
        input's (None unless ``need_input``)."""
        A, _ = self._rows(A, "cotangent stack", True)
        P, Q, K, V = self._state(True)
        Qb, Kb, Vb = core_vjp(P, Q, K, V, split_heads(matmul(A, self.Wo.T), self.heads), self.scale)
        Qb, Kb, Vb = merge_heads(Qb), merge_heads(Kb), merge_heads(Vb)
        A_in = None
        if need_input:
            A_in = matmul(Qb, self.Wq.T)
            A_in += matmul(Kb, self.Wk.T)
            A_in += matmul(Vb, self.Wv.T)
        return [Qb, Kb, Vb, A], A_in

    def param_jvp(self, t, leaf_tangent):
        """The output tangent ``(B, T, d)`` of an input tangent ``t: (B, T, d)`` (None: 0) with the leaves'
        parameter tangents added where they act: ``leaf_tangent(i, base)`` (leaf i = q, k, v, out)
        returns its tangent plus ``base``, the tangent arriving at its output point (None: 0)."""
        if t is not None:
            t, _ = self._rows(t, "tangent", False)
        base = lambda W: None if t is None else matmul(t, W)  # noqa: E731
        h = self.heads
        Qd, Kd, Vd = (leaf_tangent(i, base(W)) for i, W in enumerate((self.Wq, self.Wk, self.Wv)))
        Od = core_jvp(self.P, self.Q, self.K, self.V, split_heads(Qd, h), split_heads(Kd, h), split_heads(Vd, h),
                      self.scale)
        return leaf_tangent(3, matmul(merge_heads(Od), self.Wo))

    def jvp_stack(self, a):
        """``J`` on every row of ``a: (B, R, T, d)`` (or ``(B, R, T·d)``, ``(R, T·d)`` broadcast) -> the same
        layout with B first."""
        a, shape = self._rows(a, "tangent stack", True)
        out = self._jvp(a, True)
        return out.reshape(out.shape[:2] + tuple(shape[2 if len(shape) > 2 else 1:]))

    def vjp_stack(self, a):
        """``Jᵀ`` on every row of ``a: (B, R, T, d)`` (or ``(B, R, T·d)``, ``(R, T·d)``) -> the same layout."""
        a, shape = self._rows(a, "cotangent stack", True)
        out = self._vjp_parts(a, True)[0]
        return out.reshape(out.shape[:2] + tuple(shape[2 if len(shape) > 2 else 1:]))

    def dense(self, transposed: bool = False):
        """``(B, T·d, T·d)``, built by JVPs of the identity; only on request (tests, small T·d)."""
        eye = self.xp.eye(self.T * self.d, dtype=self.dtype)
        cols = self.jvp_stack(eye)  # row k: J e_k, column k of J
        return cols if transposed else cols.swapaxes(-1, -2)

    def rows(self, sel) -> "AttentionFactor":
        """The factor of the samples ``sel`` (a slice or a 1-D index array)."""
        _check_sample_selection(sel)
        return AttentionFactor(self.Wq, self.Wk, self.Wv, self.Wo, self.P[sel], self.Q[sel], self.K[sel],
                               self.V[sel], self.scale)

    def norm_bound(self):
        """An upper bound of ‖J‖₂ per sample, ``(B,)``, from Frobenius norms (each ≥ the spectral norm
        it stands for): ``Σ_heads ‖Wo_k‖ (‖P_k‖‖Wv_k‖ + ½‖V_k‖(‖Wq_k‖‖K_k‖ + ‖Q_k‖‖Wk_k‖)/√d_h)`` —
        ‖diag(p) − ppᵀ‖₂ ≤ ½ (Gershgorin: ``2p_i(1 − p_i) ≤ ½``), ``Wq_k`` the columns of head k,
        ``Wo_k`` its rows."""
        xp, h = self.xp, self.heads
        dh = self.d // h
        w = lambda W: _frob(W.reshape(self.d, h, dh), (0, 2))  # noqa: E731  per head: (h,)
        wo = _frob(self.Wo.reshape(h, dh, self.d), (1, 2))
        P, Q, K, V = (_frob(a, (-2, -1)) for a in (self.P, self.Q, self.K, self.V))  # (B, h)
        core = P * w(self.Wv) + 0.5 * V * (w(self.Wq) * K + Q * w(self.Wk)) * self.scale
        return xp.sum(core * wo, axis=-1)

    def singular_values(self):
        """Exact singular values, descending, ``(B, T·d)``: an SVD of ``dense()``."""
        return _svd(self.dense())

    def spectral_norm(self, seed: int = 0):
        """‖J‖₂ per sample, ``(B,)`` host float64, by batched Lanczos on ``J Jᵀ`` (``_lanczos``): one
        VJP and one JVP of the whole batch per step, nothing of size ``(T·d)²`` unless T·d is small."""
        def matvec(v, rows):
            F = self.rows(rows)
            return F.jvp(F.vjp(v))

        def dense(rows):
            D = self.rows(rows).dense()
            return D @ D.swapaxes(-1, -2)

        lam = top_eigenvalues(matvec, self.batch, self.T * self.d, xp=self.xp, dtype=self.dtype, seed=seed, dense=dense,
                              upper=_host(self.norm_bound()) ** 2, lower=np.zeros(self.batch))
        return np.sqrt(np.maximum(lam, 0.0))


def _host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)
