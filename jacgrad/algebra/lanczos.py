"""The largest eigenvalue of many symmetric positive semi-definite operators at once.

Batched Lanczos, matrix-free: the caller gives ``matvec``, which applies operator ``A_p`` to row
``p`` of a ``(P, n)`` block (for a layer, ``A_p = J_p J_pᵀ`` of sample ``p``, through the
factor's VJP and JVP). One step is one ``matvec`` of the whole block, so the exact spectral
norms of a batch of per-sample Jacobians cost a few dozen GEMMs instead of one SVD per sample,
and nothing bigger than a few ``(P, n)`` blocks is allocated (rows are processed in chunks of at
most ``ROW_ELEMENTS`` elements). Runs on NumPy or CuPy alike; the small tridiagonal
eigenproblems are solved on the host.

The top Ritz value θ grows monotonically to ``λ_max``. A row's θ comes from Sturm counts of its
small tridiagonal ``T`` at many shifts at once (to tol/4; a dense eigensolve of ``T`` when the
Ritz values are final, or ``T`` has at most ``DENSE_RITZ`` rows); a quarter of the steps taken so far later (at least
``check_every``) a Sturm count of the grown ``T`` (O(k), no eigensolve) tells whether anything
rose above ``θ(1 + tol)``: if not, θ is accepted, else the row is solved again. Testing the
stagnation over a window that grows with k keeps the test honest where θ creeps (a dense edge
of the spectrum, where θ_k ≈ λ − c/k²: the error at acceptance is then about 2·tol, not k·tol).
After a breakdown (the Krylov space became invariant) the Ritz values are exact and the test
passes at once.

Two shortcuts pick the cheaper method per row:

- ``lower``/``upper``: host bounds of λ_max per row (for a layer, ``max_i d_i²‖W[:, i]‖²`` and
  ``max_i d_i² ‖W‖₂²``). A row whose bounds already agree to ``tol`` is not iterated, and a row
  whose θ reaches ``upper(1 − tol)`` is done. This settles orthogonal layers, whose clustered
  spectra are the worst case of Lanczos, without a single step.
- ``dense``: the operators as matrices. Up to ``DIRECT_BELOW`` one batched ``eigvalsh`` is
  cheaper than Lanczos's first check and is used at once. Lanczos on a spectrum with a dense top edge (an almost
  isometric layer) needs about n steps; a row still moving after ``n // 2`` steps (by then the
  Krylov work is comparable to a dense eigensolve) is finished by a batched ``eigvalsh``.

Host transfers: one per check (every ``check_every`` steps, and at steps 2, 4, 8, … before the
first check, which catches early breakdowns): the new diagonals of ``T`` and the breakdown flags
come over together; the columns already on the host are never copied again.

    >>> import numpy as np
    >>> A = np.diag([3.0, 1.0, 0.5])
    >>> round(float(top_eigenvalues(lambda v, rows: v @ A, 1, 3, xp=np, dtype=np.float64)[0]), 12)
    3.0
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import numpy as np

from .spectra import ConvergenceWarning

__all__ = ["DENSE_RITZ", "DIRECT_BELOW", "DIRECT_MAX", "ROW_ELEMENTS", "top_eigenvalues"]

# Rows per chunk times n stays under 2^22 elements (32 MiB in float64), whatever the batch.
ROW_ELEMENTS = 1 << 22
# A tridiagonal T of up to this many Lanczos steps is solved densely (its exact λ_max: a batched
# k x k eigvalsh costs less than the Python loop of a multisection's Sturm counts).
DENSE_RITZ = 16
# ``dense`` is used for operators up to this size (a 1024 x 1024 eigvalsh per row, ~0.3 s on one core) ...
DIRECT_MAX = 1024
# ... and from the start up to this size, where one batched eigvalsh costs less than Lanczos's first check.
DIRECT_BELOW = 64


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
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    dense: Callable | None = None,
) -> np.ndarray:
    """λ_max of ``P`` symmetric PSD ``n × n`` operators: a host ``(P,)`` float64 array.

    ``matvec(v, rows)``: ``v (len(rows), n)`` on ``xp`` -> ``(len(rows), n)``, row ``i`` multiplied
    by the operator of row ``rows[i]`` (``rows`` is a ``slice``, or a host int array when
    ``lower``/``upper`` settled some rows). ``tol``: relative stagnation of the Ritz value that
    counts as converged (default 1e-12 in float64, 1e-5 in float32). ``lower``, ``upper``
    (host ``(P,)``): optional bounds of each λ_max. ``dense(rows) -> (len(rows), n, n)``:
    optional, the operators as matrices on ``xp`` (``rows`` a host int array), for the rows
    Lanczos does not settle within ``n // 2`` steps (when ``n ≤ DIRECT_MAX``). Without it, a row
    still moving after ``max_steps`` steps gets a ``ConvergenceWarning`` and its current Ritz
    value (a lower bound of λ_max).
    """
    out = np.zeros(P, dtype=np.float64)
    if P == 0 or n == 0:
        return out
    tol = _tolerance(dtype) if tol is None else tol
    todo = np.arange(P)
    if lower is not None and upper is not None:
        lower = np.asarray(lower, dtype=np.float64)
        upper = np.asarray(upper, dtype=np.float64)
        settled = lower >= upper * (1 - tol)
        out[settled] = lower[settled]
        todo = np.flatnonzero(~settled)
    direct = dense is not None and n <= DIRECT_MAX
    if direct and n <= DIRECT_BELOW:
        out[todo] = _eigvalsh_top(dense, todo, n, xp)
        return out
    budget = min(max_steps, max(first_check, n // 2)) if direct else max_steps
    chunk = max(1, ROW_ELEMENTS // n)
    # One random start shared by every row: a row's result depends on its operator only, not on
    # which rows it is batched with (a report over chunks equals the report of the whole batch).
    start_vector = xp.asarray(np.random.default_rng(seed).standard_normal(n).astype(dtype))
    left = []
    for start in range(0, todo.size, chunk):
        idx = todo[start : start + chunk]
        rows = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == idx.size else idx
        q0 = xp.broadcast_to(start_vector, (idx.size, n))
        top = None if upper is None else upper[idx]
        theta, pending = _lanczos(matvec, rows, q0, budget, tol, first_check, check_every, xp, top)
        out[idx] = theta
        left.append(idx[pending])
    left = np.concatenate(left) if left else np.zeros(0, dtype=np.int64)
    if left.size and direct:
        out[left] = _eigvalsh_top(dense, left, n, xp)
    elif left.size:
        warnings.warn(
            f"Lanczos stopped at {max_steps} steps before the top eigenvalue of {left.size} of {P} "
            f"operators settled to {tol:g}; the reported norm is a lower bound",
            ConvergenceWarning,
            stacklevel=2,
        )
    return out


def _eigvalsh_top(dense, rows: np.ndarray, n: int, xp) -> np.ndarray:
    """λ_max of the operators ``rows`` by batched dense eigensolves, ``ROW_ELEMENTS`` at a time."""
    if not rows.size:
        return np.zeros(0)
    per = max(1, ROW_ELEMENTS // (n * n))
    parts = [xp.linalg.eigvalsh(dense(rows[s : s + per]))[:, -1] for s in range(0, rows.size, per)]
    return _host(xp.concatenate(parts)).astype(np.float64)


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


def _checks(first_check: int, check_every: int, n: int, max_steps: int) -> set:
    """The steps after which the tridiagonals come to the host."""
    steps = {min(first_check, n), n}
    k = 2
    while k < first_check:
        steps.add(k)
        k *= 2
    steps.update(range(first_check, max_steps + 1, check_every))
    steps.add(max_steps)
    return {s for s in steps if 1 <= s <= max_steps}


def _lanczos(matvec, rows, q, max_steps, tol, first_check, check_every, xp, upper):
    """``(theta, pending)``: host ``(P,)`` top Ritz values and the rows not settled."""
    P, n = q.shape
    dot = _row_dot(xp)
    q = q / xp.sqrt(dot(q, q))[:, None]
    q_prev = xp.zeros_like(q)
    b_prev = xp.zeros(P, dtype=q.dtype)
    fresh: list = []  # per step (α, β, breakdown) on the device, not yet on the host: stacked at a check
    ta = np.zeros((P, 0))
    tb = np.zeros((P, 0))
    scale = xp.zeros(P, dtype=q.dtype)  # running max of |α| + β ≈ ‖A_p‖, for the breakdown test
    eps = float(np.finfo(q.dtype).eps)
    first_check = max(1, min(first_check, n))  # by step n a row's Krylov space is all of R^n
    checks = _checks(first_check, check_every, n, max_steps)
    theta = np.zeros(P)
    pending = np.ones(P, dtype=bool)  # rows whose λ_max is not settled yet
    solved = np.zeros(P, dtype=bool)  # rows of ``pending`` with a current Ritz value in theta
    test_at = np.zeros(P, dtype=np.int64)  # the step from which a solved row's θ may be tested
    for k in range(max_steps):
        w = matvec(q, rows)
        a = dot(w, q)
        w -= a[:, None] * q
        w -= b_prev[:, None] * q_prev
        # No reorthogonalisation against older vectors: lost orthogonality only duplicates
        # converged Ritz values (Paige), it never moves the largest one, so λ_max needs no
        # Krylov basis — the memory stays a few (P, n) blocks.
        b = xp.sqrt(dot(w, w))
        scale = xp.maximum(scale, xp.abs(a) + b)
        # Breakdown: the Krylov space is invariant and the Ritz values are exact eigenvalues.
        # The row continues with q = 0, which only appends zero eigenvalues to its T (A is PSD).
        stop = b <= 8 * n * eps * scale
        if xp is np and not stop.any():  # the usual step on the host: no row broke down
            w /= b[:, None]
        else:
            b = xp.where(stop, 0, b)
            w /= xp.where(stop, 1, b)[:, None]
            xp.copyto(w, 0, where=stop[:, None])  # not w[stop] = 0: a boolean-mask store syncs on CuPy
        q_prev, q, b_prev = q, w, b
        fresh.append((a, b, stop))
        steps = k + 1
        if steps not in checks:
            continue
        new = _host(xp.stack([xp.stack(col, axis=1).astype(a.dtype, copy=False) for col in zip(*fresh)],
                             axis=2)).astype(np.float64)  # (P, steps, 3) in one transfer
        fresh = []
        ta = np.concatenate([ta, new[:, :, 0]], axis=1)
        tb = np.concatenate([tb, new[:, :, 1]], axis=1)
        broke = new[:, -1, 2] > 0
        exact = steps == n or bool(broke.all())  # every row's Ritz values are exact
        tbk = tb[:, : steps - 1]
        if exact:
            need = pending.copy()
        else:
            # A multisection gives a row its Ritz value θ; later a Sturm count of the grown T
            # checks in O(k) whether λ_max moved above θ(1 + tol). Ritz values only grow, so a
            # row that passes has λ_max(T) in [θ, θ(1 + tol)] and is done.
            test = pending & solved & (test_at <= steps)
            if test.any():
                slack = k * eps * (np.abs(ta[test]).max(axis=1) + np.abs(tbk[test]).max(axis=1, initial=0.0))
                above = _any_above(ta[test], tbk[test], theta[test] * (1 + tol) + slack)
                tested = np.flatnonzero(test)
                pending[tested[~above]] = False
                solved[tested[above]] = False
            need = pending & ~solved
        if need.any() and exact:
            theta[need] = _top_eigenvalue(ta[need], tbk[need])
        elif need.any() and steps <= DENSE_RITZ:  # a small T: one batched eigensolve, cheaper than multisection
            theta[need] = _top_eigenvalue(ta[need], tbk[need])
            solved[need] = True
            test_at[need] = steps + max(check_every, steps // 4)
        elif need.any():
            theta[need] = _top_eigenvalue_bounded(ta[need], tbk[need], theta[need], tol / 4)
            solved[need] = True
            test_at[need] = steps + max(check_every, steps // 4)
        if upper is not None:  # θ ≤ λ_max ≤ upper: a row whose θ meets its upper bound is done
            pending &= ~(solved & (theta >= upper * (1 - tol)))
        if exact or not pending.any():
            return theta, np.zeros(P, dtype=bool)
    return theta, pending


def _row_dot(xp):
    """``(a, b) -> Σ_j a_ij b_ij`` of two ``(P, n)`` blocks: ``core.backend.dot_along(a, b, 1)``
    without its per-call checks (a Lanczos step makes three)."""
    if xp is np:
        return lambda a, b: np.einsum("ab,ab->a", a, b)
    return lambda a, b: (a * b).sum(axis=1)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
