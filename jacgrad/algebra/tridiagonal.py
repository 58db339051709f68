"""The small symmetric tridiagonal eigenproblems of Lanczos (``jacgrad.algebra.lanczos``), on the host.

A Lanczos run of k steps leaves per row a tridiagonal ``T`` (diagonal ``a (P, k)``, off-diagonal
``b (P, k-1)``); its largest eigenvalue, the top Ritz value, is read here three ways:
``_top_eigenvalue`` (one batched dense ``eigvalsh``: exact, O(k³)), ``_any_above`` (a Sturm count
of ``T − xI``: whether anything lies above ``x``, O(k), several shifts per row at once) and
``_top_eigenvalue_bounded`` (multisection by Sturm counts to a relative accuracy). Every function
treats each row on its own: a row's answer does not depend on the rows batched with it.

    >>> import numpy as np
    >>> a, b = np.array([[2.0, 2.0]]), np.array([[1.0]])
    >>> _top_eigenvalue(a, b), _any_above(a, b, np.array([2.5])), _any_above(a, b, np.array([3.5]))
    (array([3.]), array([ True]), array([False]))
"""

from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["STURM_BLOCK", "STURM_ELEMENTS"]


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

    ``x``: ``(P,)``, or ``(P, M)`` for M shifts per row at once (then the result is ``(P, M)``).
    The pivots of the LDLᵀ factorisation of ``T − xI`` have as many negative entries as ``T``
    has eigenvalues below ``x``; all ``k`` negative means none is above. A pivot below ``tiny``
    in size counts as ``-tiny`` (an eigenvalue at x counts as not above it).

    The recurrence is a Python loop over k, so it runs up to ``STURM_BLOCK`` pivots at a time without
    the guard (two array operations a pivot) and checks the block once; a block where some pivot
    fell below ``tiny`` (its pivots are the guarded ones up to that one) is run again with the
    guard. The counts are those of the guarded recurrence, bit for bit.
    """
    P, k = a.shape
    col = (slice(None),) + (None,) * (x.ndim - 1)
    tiny = (np.finfo(np.float64).tiny ** 0.5 * np.maximum(np.abs(a).max(axis=1), 1.0))[col]
    b2 = np.ascontiguousarray((b * b).T)[(slice(None),) + col]  # (k - 1, P[, 1])
    aT = np.ascontiguousarray(a.T)  # (k, P): each block's pivots come out C-ordered, (P[, M]) rows contiguous
    negative = np.zeros(x.shape, dtype=np.int64)
    prev = None  # the last pivot of the previous block
    block = max(1, min(STURM_BLOCK, STURM_ELEMENTS // max(x.size, 1)))  # a block stays in cache
    for lo in range(0, k, block):
        for guarded in (False, True):
            d = aT[lo : lo + block][(slice(None),) + col] - x  # a_i − x, overwritten by the pivots
            with contextlib.nullcontext() if guarded else np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                _sturm_pivots(d, b2, prev, lo, tiny, guarded)
            if guarded or not ((np.abs(d) < tiny).any() or np.isnan(d).any()):
                break
        negative += (d < 0).sum(axis=0)
        prev = d[-1]
    return negative < k


STURM_BLOCK, STURM_ELEMENTS = 32, 1 << 15  # pivots per block: at most 32, and 2^15 elements


def _sturm_pivots(d, b2, prev, lo: int, tiny, guarded: bool) -> None:
    """Pivots ``lo .. lo+len(d)-1`` in place of ``d`` (which holds ``a_i − x``), after the pivot
    ``prev`` (None at ``lo = 0``); ``guarded``: a pivot below ``tiny`` in size becomes ``-tiny``."""
    t = np.empty(d.shape[1:], dtype=np.float64)
    for j in range(len(d)):
        if prev is not None:
            np.divide(b2[lo + j - 1], prev, out=t)
            np.subtract(d[j], t, out=d[j])
        if guarded:
            np.copyto(d[j], -tiny, where=np.abs(d[j]) < tiny)
        prev = d[j]


def _top_eigenvalue_bounded(a: np.ndarray, b: np.ndarray, floor: np.ndarray, rel: float, shifts: int = 31) -> np.ndarray:
    """A lower bound θ of each tridiagonal's largest eigenvalue with λ_max ≤ θ(1 + rel), by
    multisection: Sturm counts at ``shifts`` geometrically spaced points per row and pass between
    a lower bound (``floor``, a previous Ritz value, or the largest diagonal entry) and the
    Gershgorin bound. O(k) vectorised steps per pass instead of an O(k³) dense solve; a few passes."""
    P, k = a.shape
    radius = np.zeros((P, k))
    radius[:, :-1] += np.abs(b)
    radius[:, 1:] += np.abs(b)
    lo = np.maximum(a.max(axis=1), floor)
    hi = np.maximum((a + radius).max(axis=1), lo)
    out = np.empty(P)
    zero = lo <= 0  # no positive lower bound to divide by: the dense solve
    if zero.any():
        out[zero] = _top_eigenvalue(a[zero], b[zero])
    t = np.linspace(0.0, 1.0, shifts + 2)[1:-1]
    rel = max(rel, 16 * np.finfo(np.float64).eps)  # the shifts must stay distinct floats
    live = ~zero & (hi > lo * (1 + rel))
    for _ in range(64):  # each pass narrows the bracket (in log scale) by shifts + 1
        if not live.any():
            break
        rows = np.flatnonzero(live)
        x = lo[rows, None] * (hi[rows] / lo[rows])[:, None] ** t[None]
        above = _any_above(a[rows], b[rows], x).sum(axis=1)  # shifts below some eigenvalue
        up = above > 0
        lo[rows[up]] = x[up, above[up] - 1]
        down = above < shifts
        hi[rows[down]] = x[down, above[down]]
        live[rows] = hi[rows] > lo[rows] * (1 + rel)
    out[~zero] = lo[~zero]
    return out
