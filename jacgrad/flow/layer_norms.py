"""The per-sample layer operators ``J_b J_bᵀ`` (or ``J_bᵀ J_b``) and ``‖W‖₂`` that the report's
``‖J_j‖₂`` needs, matrix-free (for Lanczos) and as dense batched Gram matrices (for the direct
eigensolve), always on the smaller side ``n = min(H_in, H_out)``.

Memory: one ``n × n`` Gram matrix of ``W`` and, for the dense form, chunks of at most
``CHUNK_ELEMENTS`` elements.
"""

from __future__ import annotations

import numpy as np

from ..algebra.lanczos import top_eigenvalues
from ..algebra.jacobian import LayerJacobian

__all__ = ["CHUNK_ELEMENTS", "REPORT_TOL", "layer_dense", "layer_gram", "report_tol", "small_gram", "weight_norm_squared"]

CHUNK_ELEMENTS = 1 << 20  # the (r, H_in, H_out) intermediate of the dense widening form: 8 MiB f64

# The report asks the per-sample ‖J_j‖₂ to this relative accuracy of ‖J_j‖₂² (≈ half of it in the
# norm); float32 arithmetic cannot settle a Ritz value that finely, so it gets 1e-5.
REPORT_TOL = 1e-6


def report_tol(dtype) -> float:
    return REPORT_TOL if np.dtype(dtype) == np.float64 else 1e-5


def small_gram(W):
    """``() -> G``: the Gram matrix of ``W: (H_in, H_out)`` on its smaller side — ``WᵀW: (H_out, H_out)``
    when ``H_out ≤ H_in``, else ``WWᵀ: (H_in, H_in)`` — formed by one GEMM on the first call and
    kept. One per layer, shared by ``weight_norm_squared``, ``layer_gram`` and ``layer_dense``:
    ``top_eigenvalues`` applies the matrix-free and the dense operator only to the rows its bounds
    leave open, often only one of them, or none."""
    G = []

    def gram():
        if not G:
            G.append(W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T)
        return G[0]

    return gram


def weight_norm_squared(xp, W, seed: int, gram=None) -> float:
    """‖W‖₂² from the smaller Gram matrix (``gram``: the layer's ``small_gram(W)``, made here when
    None): Lanczos, or its dense eigensolve where that is cheaper or Lanczos is slow to settle
    (see ``top_eigenvalues``)."""
    h_in, h_out = W.shape
    n = min(h_in, h_out)
    if n == 0:
        return 0.0
    G = (gram or small_gram(W))()

    def matvec(v, rows):
        return v @ G

    return float(top_eigenvalues(matvec, 1, n, xp=xp, dtype=W.dtype, seed=seed, tol=report_tol(W.dtype),
                                 dense=lambda rows: G[None])[0])


def layer_gram(xp, J: LayerJacobian, d, gram=None):
    """``matvec(v, rows)`` of ``J_b J_bᵀ`` (or ``J_bᵀ J_b``, on the smaller side) for the samples
    ``rows``; ``gram``: the layer's ``small_gram(J.W)`` to share, made here when None."""
    W = J.W
    if J.h_out <= J.h_in:
        G = gram or small_gram(W)  # J Jᵀ = diag(d) WᵀW diag(d): one (H_out × H_out) GEMM per step

        def matvec(v, rows):
            s = d[_device_rows(xp, rows)]
            return ((v * s) @ G()) * s

    else:

        def matvec(u, rows):  # Jᵀ J through the factor's own JVP and VJP, on the H_in side
            F = LayerJacobian(d[_device_rows(xp, rows)], W)
            return F.vjp(F.jvp(u))

    return matvec


def layer_dense(xp, J: LayerJacobian, d, gram=None):
    """``dense(rows) -> (len(rows), n, n)``: the same operators as matrices, n the smaller side;
    ``gram`` as for ``layer_gram``."""
    W = J.W
    h_in, h_out = J.h_in, J.h_out
    if h_out <= h_in:
        G = gram or small_gram(W)

        def dense(rows):
            s = d[_device_rows(xp, rows)]
            return s[:, :, None] * G()[None] * s[:, None, :]

    else:
        per = max(1, CHUNK_ELEMENTS // (h_in * h_out))  # bounds the (r, H_in, H_out) intermediate

        def dense(rows):
            s2 = d[_device_rows(xp, rows)] ** 2
            return xp.concatenate([(W[None] * s2[i : i + per, None, :]) @ W.T for i in range(0, len(rows), per)])

    return dense


def _device_rows(xp, rows):
    return rows if isinstance(rows, slice) else xp.asarray(rows)
