"""Gauss–Newton pieces from the layer factors: a JVP in parameter space and the exact diagonal.

With ``J_i = ∂y_i/∂θ`` and ``H_i`` the Hessian of sample i's loss in its output
(``jacgrad.loss_hessians``), the Gauss–Newton matrix of the batch loss ``L = mean_i ℓ_i`` is

    G = (1/B) Σ_i J_iᵀ H_i J_i.

``G v`` is one forward-mode pass in parameter space (``leaf_parameter_jvp``: the output tangent
``J_i v``), ``H_i / B`` applied per sample, and one ordinary backward pass. Its diagonal, with
``H_i = V_iᵀ V_i`` and ``G_k[i] = V_i ∂y_i/∂h_{k,i}`` (``per_sample.output_partials``) and
``S_k[i] = Σ_ρ G_k[i, ρ]²``, is, per leaf (``per_sample``'s ``(a, δ)`` pairs):

    dense  diag_W = (1/B) Σ_i outer(z_prev,i², S_k[i])     diag_b = (1/B) Σ_i S_k[i]
    norm   diag_γ = (1/B) Σ_i x̂_i² ⊙ S_k[i]                diag_β = (1/B) Σ_i S_k[i]

— one ``(H_in, B) @ (B, H_out)`` GEMM per dense layer, never a per-sample gradient.

This module knows nothing of ``MLP`` or ``Sequential``; they import it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .backend import dot_along
from .factors import ResidualFactor
from .per_sample import is_norm, leaf_factors, output_partials

__all__ = ["accumulate_leaf_diagonal", "leaf_parameter_jvp"]


def leaf_parameter_jvp(factors: Sequence[Any], leaf_input: Callable[[int], Any], dirs: Sequence[Sequence[Any]]):
    """``J_θ v``: the output tangent ``(B, n_out)`` of a parameter direction, forward mode.

    ``factors``: the per-sample factors of a chain, input → output; ``leaf_input(k)``: leaf k's
    ``a`` (``z_prev`` or ``x̂``, see ``per_sample``); ``dirs[k]``: leaf k's direction views in its
    parameters' shapes. Per leaf, with ``ż`` the incoming tangent (0 at the input):

        dense     ż ← d ⊙ (ż @ W + z_prev @ vW + vb)
        norm      ż ← J ż + x̂ ⊙ vγ (+ vβ)
        residual  ż ← ż + s · (the inner leaves' tangent of ż)"""
    t, k = _tangent(factors, None, leaf_input, dirs, 0)
    return t


def _tangent(factors, t, leaf_input, dirs, k):
    """``(tangent after factors, next leaf number)``; ``t`` None stands for a zero tangent."""
    for J in factors:
        if isinstance(J, ResidualFactor):
            inner, k = _tangent(J.inner.factors, t, leaf_input, dirs, k)
            inner *= J.scale
            t = inner if t is None else inner + t
            continue
        a, v = leaf_input(k), dirs[k]
        if is_norm(J):
            out = a * v[0]
            if t is not None:
                out += J.jvp(t)
        else:
            out = a @ v[0]
            if t is not None:
                out += t @ J.W
        if len(v) > 1:
            out += v[1]
        t = out if is_norm(J) else J.scale(out, out=out)
        k += 1
    return t, k


def accumulate_leaf_diagonal(factors: Sequence[Any], leaf_input: Callable[[int], Any], V, outs: Sequence[Sequence[Any]],
                             scale: float) -> None:
    """Add ``scale ·`` the Gauss–Newton diagonal of the cotangent rows ``V: (B, R, n_out)``
    (overwritten) into ``outs[k]``, leaf k's arrays in its parameters' shapes (module text).
    ``leaf_input(k)``: leaf k's ``a: (B, H)``."""
    leaves = leaf_factors(factors)
    for k, G in output_partials(factors, V):
        s = dot_along(G, G, 1)
        a = leaf_input(k)
        aa, first = a * a, outs[k][0]  # in place: outs[k] may be a tuple of views
        first += (dot_along(aa, s, 0) if is_norm(leaves[k]) else aa.T @ s) * scale
        if len(outs[k]) > 1:
            bias = outs[k][1]
            bias += s.sum(axis=0) * scale
