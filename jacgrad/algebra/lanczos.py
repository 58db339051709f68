"""The largest eigenvalue of many symmetric positive semi-definite operators at once.

Batched Lanczos, matrix-free: the caller gives ``matvec``, which applies operator ``A_p`` to row
``p`` of a ``(P, n)`` block (for a layer, ``A_p = J_p J_pᵀ`` of sample ``p``, through the
factor's VJP and JVP). One step is one ``matvec`` of the whole block, so the exact spectral
norms of a batch of per-sample Jacobians cost a few dozen GEMMs instead of one SVD per sample,
and nothing bigger than a few ``(P, n)`` blocks is allocated (rows are processed in chunks of at
most ``ROW_ELEMENTS`` elements). Runs on NumPy or CuPy alike; the small tridiagonal
eigenproblems are solved on the host (``jacgrad.algebra.tridiagonal``). ``top_eigenvalues_many``
runs several calls' operators (a network's layers) as one block: each set's numbers are those of
its own call, and the per-step host work is paid once.

The top Ritz value θ grows monotonically to ``λ_max``. A row's θ comes from Sturm counts of its
small tridiagonal ``T`` at many shifts at once (to tol/4; a dense eigensolve of ``T`` when the
Ritz values are final, or ``T`` has at most ``DENSE_RITZ`` rows); a quarter of the steps taken so far later (at least
``check_every``) a Sturm count of the grown ``T`` (O(k), no eigensolve) tells whether anything
rose above ``θ(1 + tol)``: if not, θ is accepted, else the row is solved again. Testing the
stagnation over a window that grows with k keeps the test honest where θ creeps (a dense edge
of the spectrum, where θ_k ≈ λ − c/k²: the error at acceptance is then about 2·tol, not k·tol).
After a breakdown (the Krylov space became invariant) the Ritz values are exact and the test
passes at once (for every row of a call that broke down: a call's rows are settled together).

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

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .spectra import ConvergenceWarning
from .tridiagonal import _any_above, _top_eigenvalue, _top_eigenvalue_bounded

__all__ = ["DENSE_RITZ", "DIRECT_BELOW", "DIRECT_MAX", "ROW_ELEMENTS", "Operators", "top_eigenvalues",
           "top_eigenvalues_many"]

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
    ops = Operators(matvec, P, seed, lower, upper, dense)
    return top_eigenvalues_many([ops], n, xp=xp, dtype=dtype, tol=tol, max_steps=max_steps, first_check=first_check,
                                check_every=check_every)[0]


@dataclass
class Operators:
    """``count`` operators of one ``top_eigenvalues`` call: its ``matvec``, ``seed``, ``lower``,
    ``upper`` and ``dense``, as documented there."""

    matvec: Callable
    count: int
    seed: int = 0
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    dense: Callable | None = None


def top_eigenvalues_many(sets: list[Operators], n: int, *, xp, dtype, tol: float | None = None, max_steps: int = 400,
                         first_check: int = 40, check_every: int = 4) -> list[np.ndarray]:
    """``top_eigenvalues`` of several ``Operators`` of one size ``n`` (a network's layers): a host
    ``(count,)`` float64 array per set, each equal, bit for bit, to that set's own call.

    The sets' rows run as one Lanczos block (up to ``ROW_ELEMENTS`` elements), so a step's host
    work, checks and transfers are paid once for all of them, not once per set; each set keeps its
    own start vector (from its ``seed``), bounds, matvec (applied to its rows of the block) and its
    own test of an invariant Krylov space (``_lanczos``'s ``groups``)."""
    outs = [np.zeros(ops.count, dtype=np.float64) for ops in sets]
    if n == 0:
        return outs
    tol = _tolerance(dtype) if tol is None else tol
    chunk = max(1, ROW_ELEMENTS // n)
    runs: dict[int, list[list]] = {}  # budget -> runs of at most `chunk` rows; each a list of segments
    for i, ops in enumerate(sets):
        out, todo = outs[i], np.arange(ops.count)
        if ops.lower is not None and ops.upper is not None:
            lower = np.asarray(ops.lower, dtype=np.float64)
            upper = np.asarray(ops.upper, dtype=np.float64)
            settled = lower >= upper * (1 - tol)
            out[settled] = lower[settled]
            todo = np.flatnonzero(~settled)
        direct = ops.dense is not None and n <= DIRECT_MAX
        if direct and n <= DIRECT_BELOW:
            out[todo] = _eigvalsh_top(ops.dense, todo, n, xp)
            continue
        if not todo.size:
            continue
        budget = min(max_steps, max(first_check, n // 2)) if direct else max_steps
        # One random start shared by every row of a set: a row's result depends on its operator only,
        # not on which rows it is batched with (a report over chunks equals the report of the whole batch).
        start_vector = xp.asarray(np.random.default_rng(ops.seed).standard_normal(n).astype(dtype))
        top = None if ops.upper is None else np.asarray(ops.upper, dtype=np.float64)
        for start in range(0, todo.size, chunk):
            idx = todo[start : start + chunk]
            rows = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == idx.size else idx
            segment = (i, idx, rows, start_vector, None if top is None else top[idx])
            packed = runs.setdefault(budget, [[]])
            if packed[-1] and sum(seg[1].size for seg in packed[-1]) + idx.size > chunk:
                packed.append([])
            packed[-1].append(segment)
    left = [[] for _ in sets]
    for budget, packed in runs.items():
        for run in packed:
            theta, pending = _run(run, sets, budget, tol, first_check, check_every, xp, n)
            at = 0
            for i, idx, _, _, _ in run:
                outs[i][idx] = theta[at : at + idx.size]
                left[i].append(idx[pending[at : at + idx.size]])
                at += idx.size
    for i, ops in enumerate(sets):
        rest = np.concatenate(left[i]) if left[i] else np.zeros(0, dtype=np.int64)
        if rest.size and ops.dense is not None and n <= DIRECT_MAX:
            outs[i][rest] = _eigvalsh_top(ops.dense, rest, n, xp)
        elif rest.size:
            warnings.warn(
                f"Lanczos stopped at {max_steps} steps before the top eigenvalue of {rest.size} of {ops.count} "
                f"operators settled to {tol:g}; the reported norm is a lower bound",
                ConvergenceWarning,
                stacklevel=3,
            )
    return outs


def _run(run: list, sets: list[Operators], budget: int, tol: float, first_check: int, check_every: int, xp, n: int):
    """One Lanczos block of the segments ``run`` (``(set, rows' indices, rows, start vector,
    upper)``, see ``top_eigenvalues_many``): ``(theta, pending)`` over its rows in order."""
    if len(run) == 1:  # one set's chunk: its own matvec on the whole block, as a single call
        i, idx, rows, start_vector, top = run[0]
        return _lanczos(sets[i].matvec, rows, xp.broadcast_to(start_vector, (idx.size, n)), budget, tol, first_check,
                        check_every, xp, top)
    bounds = np.cumsum([0] + [seg[1].size for seg in run])
    parts = [(slice(int(a), int(b)), sets[seg[0]].matvec, seg[2]) for a, b, seg in zip(bounds[:-1], bounds[1:], run)]

    def matvec(v, _rows):
        w = xp.empty_like(v)
        for at, f, rows in parts:
            w[at] = f(v[at], rows)
        return w

    q0 = xp.empty((int(bounds[-1]), n), dtype=run[0][3].dtype)  # C order: a row's sums run as in its own call
    for at, seg in zip(bounds[:-1], run):
        q0[at : at + seg[1].size] = seg[3]
    tops = [seg[4] for seg in run]
    upper = None if all(t is None for t in tops) else np.concatenate(
        [np.full(seg[1].size, np.inf) if t is None else t for seg, t in zip(run, tops)])
    groups = np.repeat(np.arange(len(run)), [seg[1].size for seg in run])
    return _lanczos(matvec, slice(0, int(bounds[-1])), q0, budget, tol, first_check, check_every, xp, upper, groups)


def _eigvalsh_top(dense, rows: np.ndarray, n: int, xp) -> np.ndarray:
    """λ_max of the operators ``rows`` by batched dense eigensolves, ``ROW_ELEMENTS`` at a time."""
    if not rows.size:
        return np.zeros(0)
    per = max(1, ROW_ELEMENTS // (n * n))
    parts = [xp.linalg.eigvalsh(dense(rows[s : s + per]))[:, -1] for s in range(0, rows.size, per)]
    return _host(xp.concatenate(parts)).astype(np.float64)



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


def _lanczos(matvec, rows, q, max_steps, tol, first_check, check_every, xp, upper, groups=None):
    """``(theta, pending)``: host ``(P,)`` top Ritz values and the rows not settled. ``groups``:
    host ``(P,)`` ints, the rows of one ``top_eigenvalues`` call's chunk (None: all of them): a
    breakdown makes a group's Ritz values exact when every row of the group broke down."""
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
        if steps == n or groups is None:  # every row's Ritz values are exact
            exact = np.full(P, steps == n or bool(broke.all()))
        else:  # a group whose rows all broke down is exact; the others go on
            exact = (np.bincount(groups, weights=~broke) == 0)[groups]
        tbk = tb[:, : steps - 1]
        # A multisection gives a row its Ritz value θ; later a Sturm count of the grown T
        # checks in O(k) whether λ_max moved above θ(1 + tol). Ritz values only grow, so a
        # row that passes has λ_max(T) in [θ, θ(1 + tol)] and is done.
        test = pending & ~exact & solved & (test_at <= steps)
        if test.any():
            slack = k * eps * (np.abs(ta[test]).max(axis=1) + np.abs(tbk[test]).max(axis=1, initial=0.0))
            above = _any_above(ta[test], tbk[test], theta[test] * (1 + tol) + slack)
            tested = np.flatnonzero(test)
            pending[tested[~above]] = False
            solved[tested[above]] = False
        final = pending & exact
        if final.any():
            theta[final] = _top_eigenvalue(ta[final], tbk[final])
        need = pending & ~exact & ~solved
        if need.any() and steps <= DENSE_RITZ:  # a small T: one batched eigensolve, cheaper than multisection
            theta[need] = _top_eigenvalue(ta[need], tbk[need])
            solved[need] = True
            test_at[need] = steps + max(check_every, steps // 4)
        elif need.any():
            theta[need] = _top_eigenvalue_bounded(ta[need], tbk[need], theta[need], tol / 4)
            solved[need] = True
            test_at[need] = steps + max(check_every, steps // 4)
        if upper is not None:  # θ ≤ λ_max ≤ upper: a row whose θ meets its upper bound is done
            pending &= ~(solved & (theta >= upper * (1 - tol)))
        pending &= ~exact
        if not pending.any():
            return theta, pending
    return theta, pending


def _row_dot(xp):
    """``(a, b) -> Σ_j a_ij b_ij`` of two ``(P, n)`` blocks: ``core.backend.dot_along(a, b, 1)``
    without its per-call checks (a Lanczos step makes three)."""
    if xp is np:
        return lambda a, b: np.einsum("ab,ab->a", a, b)
    return lambda a, b: (a * b).sum(axis=1)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
