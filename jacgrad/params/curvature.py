"""Gauss–Newton pieces from the layer factors: a JVP in parameter space and the exact diagonal.

With ``J_i = ∂y_i/∂θ`` and ``H_i`` the Hessian of sample i's loss in its output
(``jacgrad.nn.loss_hessians``), the Gauss–Newton matrix of the batch loss ``L = mean_i ℓ_i`` is

    G = (1/B) Σ_i J_iᵀ H_i J_i.

``G v`` is one forward-mode pass in parameter space (``leaf_parameter_jvp``: the output tangent
``J_i v``), ``H_i / B`` applied per sample, and one ordinary backward pass. Its diagonal, with
``H_i = V_iᵀ V_i`` and ``G_k[i] = V_i ∂y_i/∂h_{k,i}`` (``per_sample.output_partials``) and
``S_k[i] = Σ_ρ G_k[i, ρ]²``, is, per leaf (``leaf.ggn_diag_add`` of ``jacgrad.protocol.leaves``; T = 1 shown):

    dense  diag_W = (1/B) Σ_i outer(z_prev,i², S_k[i])     diag_b = (1/B) Σ_i S_k[i]
    norm   diag_γ = (1/B) Σ_i x̂_i² ⊙ S_k[i]                diag_β = (1/B) Σ_i S_k[i]

— one ``(H_in, B) @ (B, H_out)`` GEMM per dense layer, never a per-sample gradient.

This module knows nothing of ``MLP`` or ``Sequential``; they import it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..algebra.per_sample import has_leaves, inner_factors, n_leaves, output_partials, shortcut_factors

__all__ = ["accumulate_leaf_diagonal", "leaf_parameter_jvp"]


def leaf_parameter_jvp(factors: Sequence[Any], pairs: Sequence[Any], dirs: Sequence[Sequence[Any]]):
    """``J_θ v``: the output tangent ``(B, …)`` of a parameter direction, forward mode.

    ``factors``: the per-sample factors of a chain, input → output; ``pairs[k] = (leaf, a)``:
    leaf k (``jacgrad.protocol.leaves``) and its input; ``dirs[k]``: leaf k's direction views in its
    parameters' shapes. Per factor, with ``ż`` the incoming tangent (0 at the input), the factor's
    split at its parameters adds the leaf's tangent (``leaf.jvp``) where the parameters act:

        dense     ż ← d ⊙ (ż @ W + a @ vW + vb)
        norm      ż ← J ż + x̂ ⊙ vγ (+ vβ)
        residual  ż ← ż + s · (the inner leaves' tangent of ż)   (with a shortcut p: p's tangent of ż, not ż)
        no leaf   ż ← J ż"""
    t, k = _tangent(factors, None, pairs, dirs, 0)
    return t


def _tangent(factors, t, pairs, dirs, k):
    """``(tangent after factors, next leaf number)``; ``t`` None stands for a zero tangent."""
    for J in factors:
        inner = inner_factors(J)
        if inner is not None:
            inside, k = _tangent(inner, t, pairs, dirs, k)
            inside *= J.scale
            short = shortcut_factors(J)
            if short is not None:
                t, k = _tangent(short, t, pairs, dirs, k)
            t = inside if t is None else inside + t
            continue
        if not has_leaves(J):
            t = None if t is None else J.jvp(t)
            continue
        t = J.param_jvp(t, lambda i, base, k=k: pairs[k + i][0].jvp(pairs[k + i][1], dirs[k + i], base))
        k += n_leaves(J)
    return t, k


def accumulate_leaf_diagonal(factors: Sequence[Any], pairs: Sequence[Any], V, outs: Sequence[Sequence[Any]],
                             scale: float) -> None:
    """Add ``scale ·`` the Gauss–Newton diagonal of the cotangent rows ``V: (B, R, …)``
    (overwritten) into ``outs[k]``, leaf k's arrays in its parameters' shapes (module text).
    ``pairs[k] = (leaf, a)``: leaf k and its input ``a: (B, [T,] p)``."""
    for k, G in output_partials(factors, V):
        leaf, a = pairs[k]
        leaf.ggn_diag_add(outs[k], a, G, scale)
