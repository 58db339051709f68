"""Per-sample parameter-space pieces read off the layers' ``(z_{j-1}, δ_j)`` pairs and factors.

For a dense layer ``h_j = z_{j-1} @ W_j + b_j``, sample i's gradient of its own loss ``ℓ_i`` is
the outer product ``∇_{W_j} ℓ_i = z_{j-1,i} δ_{j,i}ᵀ`` and ``∇_{b_j} ℓ_i = δ_{j,i}``, with
``δ_{j,i} = ∂ℓ_i/∂h_{j,i}``. Since every jacgrad loss is the mean of per-sample losses,
``δ_{j,i} = B · (∂L/∂h_j)[i]``: the deltas of ONE ordinary backward pass, times B. So

    ‖∇_{W_j} ℓ_i‖² + ‖∇_{b_j} ℓ_i‖² = (‖z_{j-1,i}‖² + 1) · ‖δ_{j,i}‖²        (Goodfellow 2015)

costs two row norms per layer and no per-sample gradient (BackPACK's BatchL2Grad reads the same
identity off a layer's input and output gradient).

``output_partials`` is the stacked reverse sweep behind the NTK and the Gauss–Newton diagonal:
cotangent rows ``V_i: (R, n_out)`` per sample pulled back to every pre-activation,
``G_j[i] = V_i · ∂y_i/∂h_{j,i}: (R, H_j)``, one GEMM against ``W_jᵀ`` per layer for all rows.

This module knows nothing of ``MLP``: it takes weights, callables and factors, so ``mlp`` can
import it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from .backend import get_xp

__all__ = ["check_budget", "fill_grads", "grad_sq_norms", "output_partials", "per_sample_views"]

GIB = 1 << 30


def _row_sq(xp, a):
    """``Σ_k a[i, k]²`` per row: ``(B, H) -> (B,)``."""
    return xp.einsum("ij,ij->i", a, a)


def grad_sq_norms(layer_input: Callable[[int], Any], deltas: Sequence[Any], scale: float):
    """``(B, L)``: per sample and layer, ``‖∇_{W_j} ℓ_i‖² + ‖∇_{b_j} ℓ_i‖²``.

    ``layer_input(j)``: ``z_j: (B, H_j)`` (``x`` for ``j = -1``); ``deltas[j] = ∂L/∂h_j: (B, H_j)``
    of the batch loss; ``scale``: B, turning them into the per-sample ``δ_{j,i}``."""
    xp = get_xp(deltas[0])
    L, B = len(deltas), deltas[0].shape[0]
    out = xp.empty((B, L), dtype=deltas[0].dtype)
    for j, delta in enumerate(deltas):
        z = layer_input(j - 1)
        zz = _row_sq(xp, z)
        zz += 1
        zz *= _row_sq(xp, delta)
        out[:, j] = zz
    out *= scale * scale
    return out


def per_sample_views(flat, weights: Sequence[Any]) -> tuple[list, list]:
    """``(dW, db)`` views of a ``(B, P)`` block, each row laid out as ``Gradients.flat``:
    ``dW[j]: (B, H_{j-1}, H_j)``, ``db[j]: (B, H_j)``."""
    B = flat.shape[0]
    dW, db, at = [], [], 0
    for W in weights:
        n_in, n_out = W.shape
        dW.append(flat[:, at : at + n_in * n_out].reshape(B, n_in, n_out))
        at += n_in * n_out
        db.append(flat[:, at : at + n_out])
        at += n_out
    return dW, db


def fill_grads(dW: list, db: list, layer_input: Callable[[int], Any], deltas: Sequence[Any]) -> None:
    """Write ``dW[j][i] = z_{j-1,i} δ_{j,i}ᵀ`` and ``db[j][i] = δ_{j,i}`` (per-sample deltas given)."""
    xp = get_xp(deltas[0])
    for j, delta in enumerate(deltas):
        z = layer_input(j - 1)
        xp.multiply(z[:, :, None], delta[:, None, :], out=dW[j])
        db[j][...] = delta


def check_budget(what: str, nbytes: int, max_memory: float | None, hint: str) -> None:
    """A ``ValueError`` naming the size when ``nbytes`` exceeds ``max_memory`` bytes (None: no limit)."""
    if max_memory is not None and nbytes > max_memory:
        raise ValueError(
            f"{what} needs {nbytes / GIB:.3g} GiB ({nbytes} bytes), more than max_memory={max_memory / GIB:.3g} GiB; "
            f"{hint}"
        )


def output_partials(factors: Sequence[Any], V) -> Iterator[tuple[int, Any]]:
    """For ``j = K-1, …, 0`` yield ``(j, G_j)``: ``G_j = V · ∂y/∂h_j``, per sample ``(B, R, H_j)``.

    ``factors``: the network's per-sample ``LayerJacobian``s, input → output; ``V: (B, R, n_out)``
    cotangent rows per sample (overwritten). ``G_{K-1} = V ⊙ d_{K-1}``, ``G_{j-1} = (G_j W_jᵀ) ⊙
    d_{j-1}``. ``G_j`` is valid until the next step (its buffer is reused); memory
    ``O(B·R·max H)``. With ``V`` = the identity, ``G_j`` are the partial Jacobians ∂y/∂h_j."""
    xp = get_xp(V)
    A = V
    for j in range(len(factors) - 1, -1, -1):
        J = factors[j]
        G = J.scale_stack(A, inplace=True)
        yield j, G
        if j:
            B, R = G.shape[0], G.shape[1]
            A = (xp.ascontiguousarray(G).reshape(B * R, J.h_out) @ J.W.T).reshape(B, R, J.h_in)
