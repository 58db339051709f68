"""Parameter leaves: the algebra of a layer's parameter group, written once per leaf kind.

A leaf is a parameter group whose per-sample gradient is a bilinear function of the layer's
``a_i`` (``param_input``) and the per-sample cotangent ``δ_i`` at the leaf's output point. Both
carry a token axis: ``a: (B, T, p)``, ``δ: (B, T, d)``; the 2-D ``(B, p)``, ``(B, d)`` case is
T = 1 and runs today's formulas unchanged (bit for bit). ``G: (B, R, [T,] d)`` stacks R cotangent
rows per sample (``per_sample.output_partials``).

``TokenDenseLeaf`` (weight ``(p, d)``, optional bias ``(d,)``), a weight shared by the tokens:

    ∇W_i = A_iᵀ Δ_i          ∇b_i = Σ_t Δ_i,t
    ‖∇W_i‖² = ⟨A_i A_iᵀ, Δ_i Δ_iᵀ⟩ (gram, O(T²(p+d)))  or  ‖A_iᵀ Δ_i‖² (instantiate, O(T p d));
    "auto": gram when 2T² ≤ p·d (Li et al. 2021; Bu et al. 2022). T = 1: (‖a_i‖² + 1)‖δ_i‖².
    NTK  Σ_{s,t} (a_s·a′_t + 1) · G_s G′_tᵀ  (a T × T′ cross-Gram; T = 1: today's dense formula)

``ElementwiseLeaf`` (γ ``(n,)``, optional β ``(n,)``), per-feature scale and shift applied per token:

    ∇γ_i = Σ_t a_i,t ⊙ δ_i,t      ∇β_i = Σ_t δ_i,t

Every leaf kind implements the same methods (``n_arrays`` arrays, in the layer's ``params`` order):

- ``sq_norms(a, delta, counted=None, method="auto") -> (B,)``: squared per-sample norms of the
  counted arrays (``counted``: one bool per array, None: all);
- ``fill(views, a, delta)``: per-sample gradients into views ``(B, *shape)``;
- ``clipped_sum(views, a, delta, c)``: ``Σ_i c_i ∇ℓ_i`` into the parameter arrays (``delta``
  overwritten with ``c_i δ_i``);
- ``ntk_add(left, right, trace, out, method="auto")``: the leaf's share of ``J_θ J_θ′ᵀ``;
  ``left``, ``right``: ``(a, G)`` of the two sides, ``out: (Na, O, Nb, O)`` or ``(Na, Nb)`` with
  ``trace``; a weight-sharing leaf picks the cross-Gram or the per-output Jacobians by cost;
- ``jvp(a, v, base)``: the parameter tangent at the leaf's output point for direction views
  ``v`` (``base``, the tangent arriving there from the input, added in between, or None);
- ``ggn_diag_add(outs, a, G, scale)``: ``scale · Σ_i Σ_ρ (∂/∂θ of G_iρ)²`` into ``outs``.
"""

from __future__ import annotations

import operator

from typing import Any, Sequence

from ..cuda.gemm import matmul, matmul_into
from .passes import column_sums
from ..core.backend import dot_along, get_xp

__all__ = ["ElementwiseLeaf", "METHODS", "TokenDenseLeaf", "check_method", "gram_is_cheaper"]

METHODS = ("auto", "gram", "instantiate")


def check_method(method: Any) -> str:
    """``method`` of ``per_sample_grad_norms``, checked: one of ``METHODS``; else a ``ValueError`` listing them."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={method!r} is not a way to compute per-sample norms; valid: {', '.join(METHODS)}")
    return method


def gram_is_cheaper(T: int, p: int, d: int) -> bool:
    """The cost rule of ``method="auto"``: the Gram form when ``2T² ≤ p·d``."""
    return 2 * T * T <= p * d


def _counted(counted, n: int) -> list:
    return [True] * n if counted is None else list(counted)


def _one(x, axis: int = 1):
    """A one-token array with its token axis dropped (T = 1 runs the 2-D formulas, bit for bit)."""
    return x[(slice(None),) * axis + (0,)] if x.ndim == axis + 2 and x.shape[axis] == 1 else x


def _leaf_jvp(weight, a, v: Sequence[Any], base):
    """The output tangent of a leaf ``y = weight(a, W) [+ b]`` in the direction ``v = [Ẇ, (ḃ)]``,
    plus ``base`` (the tangent already arriving there, or None): ``weight(a, Ẇ) + base + ḃ``
    (``a @ Ẇ`` for a dense leaf, ``a ⊙ γ̇`` for an elementwise one); a one-token ``a`` runs the
    2-D formula (T = 1 bit for bit)."""
    if a.ndim == 3 and a.shape[1] == 1:
        return _leaf_jvp(weight, a[:, 0], v, None if base is None else base[:, 0])[:, None]
    out = weight(a, v[0])
    if base is not None:
        out += base
    if len(v) > 1:
        out += v[1]
    return out


def _grads_w(a, delta):
    """``A_iᵀ Δ_i`` per sample: ``(B, p, d)``."""
    return matmul(a.swapaxes(1, 2), delta)


class TokenDenseLeaf:
    """A weight ``W: (p, d)`` used by every token (``h_t = a_t W + b``) and an optional bias
    ``b: (d,)``. Dense is T = 1; a convolution's ``a`` holds its im2col patches."""

    def __init__(self, bias: bool = True):
        self.bias = bool(bias)
        self.n_arrays = 2 if self.bias else 1

    def __repr__(self) -> str:
        return f"TokenDenseLeaf(bias={self.bias})"

    def sq_norms(self, a, delta, counted=None, method: str = "auto"):
        counted = _counted(counted, self.n_arrays)
        a, delta = _one(a), _one(delta)
        if a.ndim == 2:  # T = 1: (‖a‖² + 1)·‖δ‖² (Goodfellow 2015)
            if self.bias and all(counted):
                zz = dot_along(a, a, 1)
                zz += 1
                zz *= dot_along(delta, delta, 1)
                return zz
            dd = dot_along(delta, delta, 1)
            out = get_xp(delta).zeros_like(dd)
            if counted[0]:
                out += dot_along(a, a, 1) * dd
            if len(counted) > 1 and counted[1]:
                out += dd
            return out
        xp = get_xp(a, delta)
        B, T, p = a.shape
        out = xp.zeros(B, dtype=delta.dtype)
        if counted[0]:
            if method == "gram" or (method == "auto" and gram_is_cheaper(T, p, delta.shape[-1])):
                out += dot_along(matmul(a, a.swapaxes(1, 2)), matmul(delta, delta.swapaxes(1, 2)), 2).sum(axis=1)
            else:
                g = _grads_w(a, delta)
                out += dot_along(g, g, 2).sum(axis=1)
        if len(counted) > 1 and counted[1]:
            s = delta.sum(axis=1)
            out += dot_along(s, s, 1)
        return out

    def fill(self, views: Sequence[Any], a, delta) -> None:
        xp = get_xp(delta)
        a, delta = _one(a), _one(delta)
        if a.ndim == 2:
            xp.multiply(a[:, :, None], delta[:, None, :], out=views[0])
            if len(views) > 1:
                views[1][...] = delta
            return
        matmul_into(a.swapaxes(1, 2), delta, views[0])
        if len(views) > 1:
            delta.sum(axis=1, out=views[1])

    def clipped_sum(self, views: Sequence[Any], a, delta, c) -> None:
        """``views[0] = Aᵀ diag(c) Δ`` with the rows ``B·T`` (one GEMM, through ``_gemm``: direct
        cuBLAS while a CUDA graph records), ``views[1] = Σ_i c_i Σ_t δ_i,t``."""
        delta *= c.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(delta.dtype, copy=False)
        rows = delta.reshape(-1, delta.shape[-1])
        matmul_into(a.reshape(-1, a.shape[-1]).T, rows, views[0])
        if len(views) > 1:
            column_sums(rows, views[1])

    def ntk_add(self, left, right, trace: bool, out, method: str = "auto") -> None:
        """``method``: "gram" (the T × T′ cross-Gram), "instantiate" (the per-output Jacobians
        ``A_iᵀ G_io``), "auto": the cheaper (``_ntk_instantiates``); T = 1 is today's formula."""
        (aa, Ga), (ab, Gb) = left, right
        aa, ab, Ga, Gb = _one(aa), _one(ab), _one(Ga, 2), _one(Gb, 2)
        if aa.ndim == 2:
            w = matmul(aa, ab.T)  # a · a' (through _gemm: direct cuBLAS while a graph records)
            if self.bias:
                w += 1
            out += (w if trace else w[:, None, :, None]) * _gram(Ga, Gb, trace)
            return
        if method == "instantiate" or (method == "auto" and self._ntk_instantiates(aa, ab, Ga, Gb)):
            out += _gram(self._jacobians(aa, Ga), self._jacobians(ab, Gb), trace)
            return
        (Na, T, p), (Nb, T2, _) = aa.shape, ab.shape  # the T × T' cross-Gram of the inputs, one GEMM
        w = matmul(aa.reshape(Na * T, p), ab.reshape(Nb * T2, p).T).reshape(Na, T, Nb, T2)
        if self.bias:
            w += 1
        O, d = Ga.shape[1], Ga.shape[3]
        # Y[i, (j, t), (o, h)] = Σ_s w[i, s, j, t] G_io,s,h: batched GEMMs over i (an einsum with the
        # shared i runs numpy's unblocked c_einsum, 50× slower)
        Y = matmul(w.reshape(Na, T, Nb * T2).swapaxes(1, 2), Ga.transpose(0, 2, 1, 3).reshape(Na, T, O * d))
        Y = Y.reshape(Na, Nb, T2, O, d).transpose(1, 0, 3, 2, 4)  # (j, i, o, t, h)
        if trace:  # Σ_o Σ_t,h Y[j, i, o, t, h] G′_jo,t,h
            out += (Y * Gb[:, None]).sum(axis=(2, 3, 4)).T
        else:  # batched GEMMs over j: (i·o, t·h) @ (t·h, q)
            K = matmul(Y.reshape(Nb, Na * O, T2 * d), Gb.reshape(Nb, O, T2 * d).swapaxes(1, 2))
            out += K.reshape(Nb, Na, O, O).transpose(1, 2, 0, 3)

    @staticmethod
    def _ntk_instantiates(aa, ab, Ga, Gb) -> bool:
        """The NTK cost rule, in multiply-adds: build the per-sample, per-output Jacobians ``A_iᵀ G_io``
        (``(N·T + N′·T′)·O·p·d``) and their ``(N·O)(N′·O)·p·d`` GEMM, where that costs less than the
        cross-Gram path's ``N·N′·T·T′·p`` (inputs) + ``N·N′·O·T′·d·(T + O)`` (its two batched GEMMs)."""
        (Na, O, T, d), (Nb, _, T2, _), p = Ga.shape, Gb.shape, aa.shape[-1]
        build = (Na * T + Nb * T2) * O * p * d + Na * O * Nb * O * p * d
        return build < Na * Nb * T * T2 * p + Na * Nb * O * T2 * d * (T + O)

    def _jacobians(self, a, G):
        """``(N, O, p·d [+ d])``: per sample and output row, ``A_iᵀ G_io`` flattened (and ``Σ_t G_io,t``)."""
        xp = get_xp(a, G)
        N, O, T, d = G.shape
        J = matmul(a.swapaxes(1, 2)[:, None], G).reshape(N, O, a.shape[-1] * d)  # batched GEMMs, not c_einsum
        return xp.concatenate([J, G.sum(axis=2)], axis=2) if self.bias else J

    def jvp(self, a, v: Sequence[Any], base):
        return _leaf_jvp(matmul, a, v, base)

    def ggn_diag_add(self, outs: Sequence[Any], a, G, scale: float) -> None:
        a, G = _one(a), _one(G, 2)
        first = outs[0]  # in place: outs may be a tuple of views
        if a.ndim == 2:
            s = dot_along(G, G, 1)
            first += matmul((a * a).T, s) * scale
            if len(outs) > 1:
                bias = outs[1]
                bias += s.sum(axis=0) * scale
            return
        get_xp(a, G)  # one device (a TypeError otherwise), an empty batch included
        for i in range(a.shape[0]):  # per sample: its R gradients A_iᵀ G_iρ, (R, p, d)
            g = matmul(a[i].T[None], G[i])
            first += (g * g).sum(axis=0) * scale
        if len(outs) > 1:
            s = G.sum(axis=2)
            bias = outs[1]
            bias += (s * s).sum(axis=(0, 1)) * scale


class ElementwiseLeaf:
    """A per-feature scale ``γ: (n,)`` and optional shift ``β: (n,)`` applied per token
    (``y_t = γ ⊙ a_t + β``: LayerNorm, RMSNorm with ``a = x̂``)."""

    def __init__(self, bias: bool = True):
        self.bias = bool(bias)
        self.n_arrays = 2 if self.bias else 1

    def __repr__(self) -> str:
        return f"ElementwiseLeaf(bias={self.bias})"

    @staticmethod
    def _tok(x):
        """Sum over the token axis of a ``(B, T, n)`` array; a ``(B, n)`` one as it is."""
        return x if x.ndim == 2 else x.sum(axis=1)

    def sq_norms(self, a, delta, counted=None, method: str = "auto"):
        counted = _counted(counted, self.n_arrays)
        a, delta = _one(a), _one(delta)
        ag = self._tok(a * delta)
        sq = dot_along(ag, ag, 1) if counted[0] else get_xp(ag).zeros(ag.shape[0], ag.dtype)
        if len(counted) > 1 and counted[1]:
            s = self._tok(delta)
            sq += dot_along(s, s, 1)
        return sq

    def fill(self, views: Sequence[Any], a, delta) -> None:
        xp = get_xp(delta)
        a, delta = _one(a), _one(delta)
        if a.ndim == 2:
            xp.multiply(a, delta, out=views[0])
            if len(views) > 1:
                views[1][...] = delta
            return
        (a * delta).sum(axis=1, out=views[0])
        if len(views) > 1:
            delta.sum(axis=1, out=views[1])

    def clipped_sum(self, views: Sequence[Any], a, delta, c) -> None:
        xp = get_xp(delta)
        delta *= c.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(delta.dtype, copy=False)
        d = delta.shape[-1]
        rows = delta.reshape(-1, d)
        column_sums(xp.multiply(a.reshape(-1, d), rows), views[0])
        if len(views) > 1:
            column_sums(rows, views[1])

    def ntk_add(self, left, right, trace: bool, out, method: str = "auto") -> None:
        (aa, Ga), (ab, Gb) = left, right
        aa, ab, Ga, Gb = _one(aa), _one(ab), _one(Ga, 2), _one(Gb, 2)
        if aa.ndim == 2:
            out += _gram(aa[:, None, :] * Ga, ab[:, None, :] * Gb, trace)
            if self.bias:
                out += _gram(Ga, Gb, trace)
            return
        out += _gram((aa[:, None] * Ga).sum(axis=2), (ab[:, None] * Gb).sum(axis=2), trace)
        if self.bias:
            out += _gram(Ga.sum(axis=2), Gb.sum(axis=2), trace)

    def jvp(self, a, v: Sequence[Any], base):
        return _leaf_jvp(operator.mul, a, v, base)

    def ggn_diag_add(self, outs: Sequence[Any], a, G, scale: float) -> None:
        a, G = _one(a), _one(G, 2)
        first = outs[0]
        if a.ndim == 2:
            s = dot_along(G, G, 1)
            first += dot_along(a * a, s, 0) * scale
            if len(outs) > 1:
                bias = outs[1]
                bias += s.sum(axis=0) * scale
            return
        u = (a[:, None] * G).sum(axis=2)  # (B, R, n): per row, Σ_t a_t ⊙ G_t
        first += (u * u).sum(axis=(0, 1)) * scale
        if len(outs) > 1:
            s = G.sum(axis=2)
            bias = outs[1]
            bias += (s * s).sum(axis=(0, 1)) * scale


def _gram(Ga, Gb, trace: bool):
    """``Σ_h Ga[i, o, h] Gb[j, o', h]``: ``(Na, O, Nb, O)``, or ``(Na, Nb)`` summed over ``o = o'``."""
    Na, O, H = Ga.shape
    Nb = Gb.shape[0]
    if trace:
        return matmul(Ga.reshape(Na, O * H), Gb.reshape(Nb, O * H).T)
    return matmul(Ga.reshape(Na * O, H), Gb.reshape(Nb * O, H).T).reshape(Na, O, Nb, O)
