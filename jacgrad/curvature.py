"""Gauss–Newton pieces from the layer factors: a JVP in parameter space and the exact diagonal.

With ``J_i = ∂y_i/∂θ`` and ``H_i`` the Hessian of sample i's loss in its output
(``jacgrad.loss_hessians``), the Gauss–Newton matrix of the batch loss ``L = mean_i ℓ_i`` is

    G = (1/B) Σ_i J_iᵀ H_i J_i.

``G v`` is one forward-mode pass in parameter space (``parameter_jvp``: the output tangent
``J_i v``), ``H_i / B`` applied per sample, and one ordinary backward pass. Its diagonal, with
``H_i = V_iᵀ V_i`` and ``G_j[i] = V_i ∂y_i/∂h_{j,i}`` (``per_sample.output_partials``), is

    diag_{W_j} = (1/B) Σ_i outer(z_{j-1,i}², Σ_ρ G_j[i, ρ]²),   diag_{b_j} = (1/B) Σ_i Σ_ρ G_j[i, ρ]²

— one ``(H_{j-1}, B) @ (B, H_j)`` GEMM per layer, never a per-sample gradient.

This module knows nothing of ``MLP``; ``mlp`` imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .backend import get_xp
from .per_sample import output_partials

__all__ = ["accumulate_diagonal", "parameter_jvp"]


def parameter_jvp(factors: Sequence[Any], layer_input: Callable[[int], Any], vW: Sequence[Any], vb: Sequence[Any]):
    """``J_θ v``: the output tangent ``(B, n_out)`` of a parameter direction ``v = (vW, vb)``.

    Forward mode, layer by layer: ``ḣ_j = ż_{j-1} @ W_j + z_{j-1} @ vW_j + vb_j``,
    ``ż_j = d_j ⊙ ḣ_j`` (the factor's ``scale``), ``ż_{-1} = 0``. ``layer_input(j)`` is ``z_j``
    (``x`` for ``j = -1``); ``factors`` the per-sample ``LayerJacobian``s, input → output."""
    t = None
    for j, J in enumerate(factors):
        hdot = layer_input(j - 1) @ vW[j]
        if t is not None:
            hdot += t @ J.W
        hdot += vb[j]
        t = J.scale(hdot, out=hdot)
    return t


def accumulate_diagonal(factors: Sequence[Any], layer_input: Callable[[int], Any], V, dW: list, db: list,
                        scale: float) -> None:
    """Add ``scale · Σ_i outer(z_{j-1,i}², Σ_ρ G_j[i, ρ]²)`` to ``dW[j]`` and ``scale · Σ_i Σ_ρ G_j[i, ρ]²``
    to ``db[j]``, for the cotangent rows ``V: (B, R, n_out)`` (overwritten)."""
    xp = get_xp(V)
    for j, G in output_partials(factors, V):
        s = xp.einsum("brh,brh->bh", G, G)
        z = layer_input(j - 1)
        dW[j] += ((z * z).T @ s) * scale
        db[j] += s.sum(axis=0) * scale
