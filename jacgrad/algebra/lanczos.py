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
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .spectra import ConvergenceWarning
from .lanczos_block import DENSE_RITZ, Deferred, _lanczos

__all__ = ["DENSE_RITZ", "DIRECT_BELOW", "DIRECT_MAX", "ROW_ELEMENTS", "Operators", "top_eigenvalues",
           "top_eigenvalues_many"]

# Rows per chunk times n stays under 2^22 elements (32 MiB in float64), whatever the batch.
ROW_ELEMENTS = 1 << 22
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
    ``upper`` and ``dense``, as documented there. ``bound_by``: the index, in the same
    ``top_eigenvalues_many`` call, of a set of one operator whose λ_max multiplies ``upper``
    (a layer's per-sample ``‖J_b‖₂² ≤ max d_b²·‖W‖₂²``, with ‖W‖₂² that set's): the answer is that
    of calling that set first and this one with ``upper · λ_max``."""

    matvec: Callable
    count: int
    seed: int = 0
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    dense: Callable | None = None
    bound_by: int | None = None


def top_eigenvalues_many(sets: list[Operators], n: int, *, xp, dtype, tol: float | None = None, max_steps: int = 400,
                         first_check: int = 40, check_every: int = 4) -> list[np.ndarray]:
    """``top_eigenvalues`` of several ``Operators`` of one size ``n`` (a network's layers): a host
    ``(count,)`` float64 array per set, each equal, bit for bit, to that set's own call.

    The sets' rows run as one Lanczos block (up to ``ROW_ELEMENTS`` elements), so a step's host
    work, checks and transfers are paid once for all of them, not once per set; each set keeps its
    own start vector (from its ``seed``), bounds, matvec (applied to its rows of the block) and its
    own test of an invariant Krylov space (``_lanczos``'s ``groups``). A set ``bound_by`` another
    runs in the same block as it, its bound applied when that one settles (``Deferred``), where
    they fit in one block; else after it."""
    outs = [np.zeros(ops.count, dtype=np.float64) for ops in sets]
    if n == 0:
        return outs
    tol = _tolerance(dtype) if tol is None else tol
    chunk = max(1, ROW_ELEMENTS // n)
    budget = lambda ops: min(max_steps, max(first_check, n // 2)) if ops.dense is not None and n <= DIRECT_MAX \
        else max_steps  # noqa: E731
    refs = sorted({ops.bound_by for ops in sets if ops.bound_by is not None})
    for j in refs:
        if not 0 <= j < len(sets) or sets[j].count != 1 or sets[j].bound_by is not None or sets[j].dense is None:
            raise ValueError(f"bound_by={j}: not the index of a set of one operator with a dense form and no "
                             f"bound_by of its own")
    iterated = [ops for ops in sets if ops.count and not (ops.dense is not None and n <= DIRECT_BELOW)]
    together = all(sets[j] in iterated for j in refs) and len({budget(ops) for ops in iterated}) == 1 and \
        sum(ops.count for ops in iterated) <= chunk
    if refs and not together:  # the bounding sets first, then the others with their bounds
        first = dict(zip(refs, top_eigenvalues_many([sets[j] for j in refs], n, xp=xp, dtype=dtype, tol=tol,
                                                    max_steps=max_steps, first_check=first_check,
                                                    check_every=check_every)))
        rest = [i for i in range(len(sets)) if i not in first]
        bound = [replace(sets[i], upper=None if sets[i].bound_by is None else sets[i].upper * first[sets[i].bound_by][0],
                         bound_by=None) for i in rest]
        got = dict(zip(rest, top_eigenvalues_many(bound, n, xp=xp, dtype=dtype, tol=tol, max_steps=max_steps,
                                                  first_check=first_check, check_every=check_every)))
        return [first[i] if i in first else got[i] for i in range(len(sets))]
    runs: dict[int, list[list]] = {}  # budget -> runs of at most `chunk` rows; each a list of segments
    for i, ops in enumerate(sets):
        out, todo = outs[i], np.arange(ops.count)
        if ops.lower is not None and ops.upper is not None and ops.bound_by is None:
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
        # One random start shared by every row of a set: a row's result depends on its operator only,
        # not on which rows it is batched with (a report over chunks equals the report of the whole batch).
        start_vector = xp.asarray(np.random.default_rng(ops.seed).standard_normal(n).astype(dtype))
        top = None if ops.upper is None or ops.bound_by is not None else np.asarray(ops.upper, dtype=np.float64)
        for start in range(0, todo.size, chunk):
            idx = todo[start : start + chunk]
            rows = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == idx.size else idx
            segment = (i, idx, rows, start_vector, None if top is None else top[idx])
            packed = runs.setdefault(budget(ops), [[]])
            if packed[-1] and sum(seg[1].size for seg in packed[-1]) + idx.size > chunk:
                packed.append([])
            packed[-1].append(segment)
    left = [[] for _ in sets]
    for steps, packed in runs.items():
        for run in packed:
            theta, pending = _run(run, sets, steps, tol, first_check, check_every, xp, n)
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
    upper)``, see ``top_eigenvalues_many``): ``(theta, pending)`` over its rows in order, the
    ``bound_by`` sets' rows settled with their bounds, and the bounding rows Lanczos left pending
    finished by their dense form first (as ``top_eigenvalues_many`` would)."""
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
    linked = [k for k, seg in enumerate(run) if sets[seg[0]].bound_by is not None]
    upper = None if all(t is None for t in tops) and not linked else np.concatenate(
        [np.full(seg[1].size, np.inf) if t is None else t for seg, t in zip(run, tops)])
    groups = np.repeat(np.arange(len(run)), [seg[1].size for seg in run])
    deferred = None
    if linked:
        where = {seg[0]: int(at) for at, seg in zip(bounds[:-1], run)}  # a set's first row in the block
        rows = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in linked])
        ops = [sets[run[k][0]] for k in linked]
        deferred = Deferred(rows, np.repeat([where[o.bound_by] for o in ops], [o.count for o in ops]),
                            np.concatenate([np.asarray(o.upper, dtype=np.float64) for o in ops]),
                            np.concatenate([np.full(o.count, -np.inf) if o.lower is None else
                                            np.asarray(o.lower, dtype=np.float64) for o in ops]), tol)
    theta, pending = _lanczos(matvec, slice(0, int(bounds[-1])), q0, budget, tol, first_check, check_every, xp, upper,
                              groups, deferred)
    if deferred is not None and deferred.open.any():  # a bounding row Lanczos left: its dense λ, then the bound
        for src in np.unique(deferred.source[deferred.open]):
            k = int(np.searchsorted(bounds, src, side="right")) - 1
            theta[src] = _eigvalsh_top(sets[run[k][0]].dense, np.array([src - bounds[k]]), n, xp)[0]
            pending[src] = False
        deferred.resolve(theta, pending, upper)
    for src in [] if deferred is None else deferred.rerun:  # as their own call, with the bound now known
        for k in linked:
            ops = sets[run[k][0]]
            if where[ops.bound_by] == src:
                own = replace(ops, upper=np.asarray(ops.upper, dtype=np.float64) * theta[src], bound_by=None)
                theta[bounds[k] : bounds[k + 1]] = top_eigenvalues_many(
                    [own], n, xp=xp, dtype=q0.dtype, tol=tol, max_steps=budget, first_check=first_check,
                    check_every=check_every)[0]
    return theta, pending


def _eigvalsh_top(dense, rows: np.ndarray, n: int, xp) -> np.ndarray:
    """λ_max of the operators ``rows`` by batched dense eigensolves, ``ROW_ELEMENTS`` at a time."""
    if not rows.size:
        return np.zeros(0)
    per = max(1, ROW_ELEMENTS // (n * n))
    parts = [xp.linalg.eigvalsh(dense(rows[s : s + per]))[:, -1] for s in range(0, rows.size, per)]
    return _host(xp.concatenate(parts)).astype(np.float64)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
