"""The largest eigenvalue of many symmetric positive semi-definite operators at once.

Batched Lanczos, matrix-free: the caller gives ``matvec``, which applies operator ``A_p`` to row
``p`` of a ``(P, n)`` block (for a layer, ``A_p = J_p J_pᵀ`` of sample ``p``, through the
factor's VJP and JVP). One step is one ``matvec`` of the whole block, so the exact spectral
norms of a batch of per-sample Jacobians cost a few dozen GEMMs instead of one SVD per sample,
and nothing bigger than a few ``(P, n)`` blocks is allocated (rows are processed in chunks of at
most ``ROW_ELEMENTS`` elements). Runs on NumPy or CuPy alike; the small tridiagonal
eigenproblems are solved on the host.

The top Ritz value θ grows monotonically to ``λ_max``. A row's θ comes from one dense
eigensolve of its small tridiagonal ``T``; ``check_every`` steps later a Sturm count of the
grown ``T`` (O(k), no eigensolve) tells whether anything rose above ``θ(1 + tol)``: if not, θ is
accepted, else the row is solved again. After a breakdown (the Krylov space became invariant)
the Ritz values are exact and the test passes at once.

    >>> import numpy as np
    >>> A = np.diag([3.0, 1.0, 0.5])
    >>> round(float(top_eigenvalues(lambda v, rows: v @ A, 1, 3, xp=np, dtype=np.float64)[0]), 12)
    3.0
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from .spectra import ConvergenceWarning

__all__ = ["top_eigenvalues", "ROW_ELEMENTS"]

# Rows per chunk times n stays under 2^22 elements (32 MiB in float64), whatever the batch.
ROW_ELEMENTS = 1 << 22


def _tolerance(dtype) -> float:
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5


def top_eigenvalues(
    matvec: Callable,
    P: int,
    n: int,
    *,
    xp,
    dtype,
    seed: int = 0,
    tol: float | None = None,
    max_steps: int = 400,
    first_check: int = 40,
    check_every: int = 4,
) -> np.ndarray:
    """λ_max of ``P`` symmetric PSD ``n × n`` operators: a host ``(P,)`` float64 array.

    ``matvec(v, rows)``: ``v (len(rows), n)`` on ``xp`` -> ``(len(rows), n)``, row ``i`` multiplied
    by the operator of row ``rows.start + i`` (``rows`` is a ``slice``). ``tol``: relative
    stagnation of the Ritz value that counts as converged (default 1e-12 in float64, 1e-5 in
    float32). After ``max_steps`` steps a row still moving gets a ``ConvergenceWarning`` and its
    current Ritz value (a lower bound of λ_max).
    """
    out = np.zeros(P, dtype=np.float64)
    if P == 0 or n == 0:
        return out
    tol = _tolerance(dtype) if tol is None else tol
    chunk = max(1, ROW_ELEMENTS // n)
    rng = np.random.default_rng(seed)
    for start in range(0, P, chunk):
        rows = slice(start, min(P, start + chunk))
        q0 = rng.standard_normal((rows.stop - rows.start, n))
        out[rows] = _lanczos(matvec, rows, xp.asarray(q0.astype(dtype)), max_steps, tol, first_check, check_every, xp)
    return out


def _tridiagonals(alpha: list, beta: list, xp) -> tuple[np.ndarray, np.ndarray]:
    """Host float64 ``(a: (P, k), b: (P, k-1))``: the diagonals of every row's ``T_k``."""
    a = _host(xp.stack(alpha, axis=1)).astype(np.float64)
    k = a.shape[1]
    b = _host(xp.stack(beta[: k - 1], axis=1)).astype(np.float64) if k > 1 else np.zeros((a.shape[0], 0))
    return a, b


def _top_eigenvalue(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest eigenvalue of the symmetric tridiagonals with diagonals ``a (P, k)``, ``b (P, k-1)``."""
    P, k = a.shape
    T = np.zeros((P, k, k))
    i = np.arange(k)
    T[:, i, i] = a
    T[:, i[:-1], i[1:]] = b
    T[:, i[1:], i[:-1]] = b
    return np.linalg.eigvalsh(T)[:, -1]


def _any_above(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row, whether its tridiagonal has an eigenvalue above ``x`` (Sturm count, O(k)).

    The pivots of the LDLᵀ factorisation of ``T − xI`` have as many negative entries as ``T``
    has eigenvalues below ``x``; all ``k`` negative means none is above.
    """
    P, k = a.shape
    b2 = b * b
    tiny = np.finfo(np.float64).tiny ** 0.5 * np.maximum(np.abs(a).max(axis=1), 1.0)
    negative = np.zeros(P, dtype=np.int64)
    d = None
    for i in range(k):
        d = a[:, i] - x if i == 0 else (a[:, i] - x) - b2[:, i - 1] / d
        d = np.where(np.abs(d) < tiny, -tiny, d)  # an eigenvalue at x counts as not above it
        negative += d < 0
    return negative < k


def _dot(xp, a, b):
    return xp.einsum("pn,pn->p", a, b)


def _lanczos(matvec, rows, q, max_steps, tol, first_check, check_every, xp) -> np.ndarray:
    P, n = q.shape
    q = q / xp.sqrt(_dot(xp, q, q))[:, None]
    q_prev = xp.zeros_like(q)
    b_prev = xp.zeros(P, dtype=q.dtype)
    alpha: list = []
    beta: list = []
    scale = xp.zeros(P, dtype=q.dtype)  # running max of |α| + β ≈ ‖A_p‖, for the breakdown test
    eps = float(np.finfo(q.dtype).eps)
    first_check = max(1, min(first_check, n))  # by step n a row's Krylov space is all of R^n
    theta = np.zeros(P)
    pending = np.ones(P, dtype=bool)  # rows whose λ_max is not settled yet
    solved = np.zeros(P, dtype=bool)  # rows of ``pending`` with a current Ritz value in theta
    for k in range(max_steps):
        w = matvec(q, rows)
        a = _dot(xp, w, q)
        w -= a[:, None] * q
        w -= b_prev[:, None] * q_prev
        # No reorthogonalisation against older vectors: lost orthogonality only duplicates
        # converged Ritz values (Paige), it never moves the largest one, so λ_max needs no
        # Krylov basis — the memory stays a few (P, n) blocks.
        b = xp.sqrt(_dot(xp, w, w))
        scale = xp.maximum(scale, xp.abs(a) + b)
        # Breakdown: the Krylov space is invariant and the Ritz values are exact eigenvalues.
        # The row continues with q = 0, which only appends zero eigenvalues to its T (A is PSD).
        stop = b <= 8 * n * eps * scale
        b = xp.where(stop, 0, b)
        w /= xp.where(stop, 1, b)[:, None]
        xp.copyto(w, 0, where=stop[:, None])  # not w[stop] = 0: a boolean-mask store syncs on CuPy
        q_prev, q, b_prev = q, w, b
        alpha.append(a)
        beta.append(b)
        steps = k + 1
        exact = steps == n or (steps % check_every == 0 and steps <= first_check and bool(stop.all()))
        if exact:  # every row broke down (its Ritz values are exact), or the Krylov space is all of R^n
            first_check = min(first_check, steps)
        if steps < first_check or (steps - first_check) % check_every:
            continue
        # One dense solve gives a row its Ritz value θ; afterwards a Sturm count of the grown
        # T checks in O(k) whether λ_max moved above θ(1 + tol). Ritz values only grow, so a
        # row that passes has λ_max(T) in [θ, θ(1 + tol)] and is done.
        ta, tb = _tridiagonals(alpha, beta, xp)
        test = pending & solved
        if test.any():
            slack = k * eps * (np.abs(ta[test]).max(axis=1) + np.abs(tb[test]).max(axis=1, initial=0.0))
            above = _any_above(ta[test], tb[test], theta[test] * (1 + tol) + slack)
            done = np.flatnonzero(test)[~above]
            pending[done] = False
            solved[np.flatnonzero(test)[above]] = False
        if not pending.any():
            return theta
        need = pending & ~solved
        theta[need] = _top_eigenvalue(ta[need], tb[need])
        solved[need] = True
        if exact and bool(stop.all()):
            return theta
    warnings.warn(
        f"Lanczos stopped at {max_steps} steps before the top eigenvalue of {int(pending.sum())} of {P} "
        f"operators settled to {tol:g}; the reported norm is a lower bound",
        ConvergenceWarning,
        stacklevel=3,
    )
    return theta


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
