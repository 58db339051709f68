"""Singular values and spectral norms: exact (SVD of a materialised stack) and matrix-free
(power iteration on Jᵀ J through a JVP and a VJP), on NumPy or CuPy alike."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from ..core.backend import get_xp
from ..cuda.gemm import matmul

__all__ = ["ConvergenceWarning", "METHODS", "singular_values", "spectral_norm_dense", "matrix_2norm", "power_spectral_norm"]


class ConvergenceWarning(UserWarning):
    """An iterative estimate stopped at ``max_iter`` before reaching its tolerance."""


METHODS = ("svd", "gram")


def singular_values(a, method: str = "svd"):
    """Singular values of ``a: (..., m, n)``, descending: ``(..., min(m, n))``. Empty stacks work.

    ``method``:

    - ``"svd"`` (the default, exact to rounding: every σ to ``~eps·σ_max``): LAPACK's SVD on NumPy;
      on CuPy, ``cupy.linalg.svd``, which loops cuSOLVER's ``gesvd`` over the stack, one launch
      sequence per matrix.
    - ``"gram"``: the eigenvalues λ of the smaller Gram matrix (``a aᵀ`` when ``m ≤ n``, else
      ``aᵀ a``: ``(..., k, k)``, one batched GEMM), ``σ = sqrt(max(λ, 0))``, in ONE batched
      symmetric eigensolve: ``xp.linalg.eigvalsh`` on the stack, which on CuPy is cuSOLVER's Jacobi
      ``syevjBatched`` for the whole stack (``cupy.linalg.eigvalsh`` of a stack calls
      ``cupyx.cusolver.syevj``, batched: cupy/linalg/_eigenvalue.py). Accuracy cost: λ carries an
      absolute error ``~eps·σ_max²``, so ``σ`` has ``~eps·σ_max²/σ`` — as good as the SVD, relative
      to σ_max, for σ near σ_max, but a floor of ``~sqrt(eps)·σ_max`` for the small ones (σ below
      it come out anywhere in ``[0, ~sqrt(eps)·σ_max]``: 1.5e-8·σ_max in float64, 3.5e-4·σ_max in
      float32). Use it where the spectrum's large end matters (norms, conditioning down to that
      floor) and the speed of one batched solve does.
    """
    if method not in METHODS:
        raise ValueError(f"singular_values: method={method!r} is not one of {', '.join(map(repr, METHODS))}")
    xp = get_xp(a)
    k = min(a.shape[-2], a.shape[-1])
    if a.size == 0:
        return xp.zeros(a.shape[:-2] + (k,), dtype=a.dtype)
    if method == "svd":
        return xp.linalg.svd(a, compute_uv=False)
    at = a.swapaxes(-1, -2)
    gram = matmul(a, at) if a.shape[-2] <= a.shape[-1] else matmul(at, a)         # (..., k, k)
    lam = xp.linalg.eigvalsh(gram)                                                 # ascending
    return xp.sqrt(xp.maximum(lam[..., ::-1], 0))


def spectral_norm_dense(a):
    """‖a‖₂ of each matrix of ``a: (..., m, n)``: shape ``(...)``; 0 for an empty matrix."""
    s = singular_values(a)
    xp = get_xp(a)
    if s.shape[-1] == 0:
        return xp.zeros(s.shape[:-1], dtype=a.dtype)
    return s[..., 0]


def matrix_2norm(W):
    """‖W‖₂ of one 2-D matrix as a 0-d array of its dtype."""
    return spectral_norm_dense(W)


def power_spectral_norm(
    jvp: Callable,
    vjp: Callable,
    u0,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    check_every: int = 8,
):
    """Largest singular value of each sample's J by power iteration on JᵀJ, matrix-free.

    ``jvp: (B, n_in) -> (B, n_out)`` and ``vjp: (B, n_out) -> (B, n_in)`` act row by row
    (one row a sample), ``u0: (B, n_in)`` a random start. Each iteration is one JVP and one
    VJP; it stops when every sample's estimate moved by less than ``tol`` (relative) between
    two iterations. The device is asked only every ``check_every`` iterations (one host
    transfer each), so the iterations queue up without a sync between them. Returns ``(B,)``.
    Warns ``ConvergenceWarning`` at ``max_iter``.
    """
    xp = get_xp(u0)
    u = u0 / _row_norms(u0, xp)[:, None]
    sigma = xp.zeros(u.shape[0], dtype=u.dtype)
    for it in range(max_iter):
        t = jvp(u)
        new = _row_norms(t, xp)  # ‖J u‖ with ‖u‖ = 1: the Rayleigh quotient's square root
        w = vjp(t)
        wn = _row_norms(w, xp)
        u = w / xp.where(wn > 0, wn, 1)[:, None]
        done = xp.abs(new - sigma) <= tol * xp.maximum(new, np.finfo(new.dtype).tiny)
        sigma = new
        if it > 0 and (it % check_every == 0 or it == max_iter - 1) and bool(done.all()):
            return sigma
    warnings.warn(
        f"power iteration did not reach tol={tol} in {max_iter} iterations; "
        "the two largest singular values may be close — raise max_iter or use method='exact'",
        ConvergenceWarning,
        stacklevel=3,
    )
    return sigma


def _row_norms(a, xp):
    return xp.sqrt((a * a).sum(axis=-1))
