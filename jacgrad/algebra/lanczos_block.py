"""One block of batched Lanczos (``jacgrad.algebra.lanczos`` sets it up): the iteration, its
checks on the host, and rows whose upper bound another row of the block is still computing.

``_lanczos`` runs ``matvec`` on a ``(P, n)`` block and settles each row's top Ritz value as the
``jacgrad.algebra.lanczos`` docstring describes; ``groups`` say which rows form one call's chunk
(a breakdown of all of them makes their Ritz values exact). ``Deferred`` rows have the bound
``scale · λ`` where λ is another row's result (a layer's per-sample ``‖J_b‖₂² ≤ max d_b² ‖W‖₂²``,
with ‖W‖₂² in the same block): they run without it, their checks are kept, and once λ settles
``Deferred.resolve`` ends each of them where its own call, given the bound from the start, would
have: at the first check where it settled or its Ritz value met the bound; the others go on with
the bound. A call whose bound settles rows before any step (an orthogonal layer) runs again on
its own, after the block.
"""

from __future__ import annotations

import numpy as np

from .tridiagonal import _any_above, _top_eigenvalue, _top_eigenvalue_bounded

# A tridiagonal T of up to this many Lanczos steps is solved densely (its exact λ_max: a batched
# k x k eigvalsh costs less than the Python loop of a multisection's Sturm counts).
DENSE_RITZ = 16


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


def _lanczos(matvec, rows, q, max_steps, tol, first_check, check_every, xp, upper, groups=None, deferred=None):
    """``(theta, pending)``: host ``(P,)`` top Ritz values and the rows not settled. ``groups``:
    host ``(P,)`` ints, the rows of one ``top_eigenvalues`` call's chunk (None: all of them): a
    breakdown makes a group's Ritz values exact when every row of the group broke down.
    ``deferred``: a ``Deferred`` (its rows' ``upper`` inf until resolved, then updated in place),
    or None."""
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
        if deferred is not None:
            deferred.record(theta, solved, pending & ~exact)
        if upper is not None:  # θ ≤ λ_max ≤ upper: a row whose θ meets its upper bound is done
            pending &= ~(solved & (theta >= upper * (1 - tol)))
        pending &= ~exact
        if deferred is not None:
            deferred.resolve(theta, pending, upper)
        if not pending.any():
            return theta, pending
    return theta, pending


class Deferred:
    """Rows ``rows`` of a block whose upper bound is ``scale · θ[source]`` (block indices), with
    ``lower`` their lower bounds (-inf: none) and ``tol`` the block's; ``open``: the rows not
    resolved yet; ``rerun``: the sources whose rows must run again as their own call (see
    ``resolve``). One source's rows are one call's."""

    def __init__(self, rows, source, scale, lower, tol: float):
        self.rows, self.source, self.scale, self.lower, self.tol = rows, source, scale, lower, tol
        self.open = np.ones(len(rows), dtype=bool)
        self.history: list = []  # per check: (θ, solved, still pending) of the rows
        self.rerun: list[int] = []

    def record(self, theta, solved, still) -> None:
        """Keep a check's state of the rows (``still``: pending after it, before any upper bound)."""
        if self.open.any():
            r = self.rows
            self.history.append((theta[r].copy(), solved[r].copy(), still[r].copy()))

    def resolve(self, theta, pending, upper) -> None:
        """Apply the bound of every open row whose source is no longer pending (its θ final), in place.

        A call whose bounds settle some rows before any step would have run its other rows in a
        smaller block (other GEMM shapes): those rows stop here and go to ``rerun``. Otherwise its
        block was this one's rows: each check is replayed with the bound, and a row ends at the first
        that ended it (settled, or its θ met the bound); the others go on with the bound."""
        ready = self.open & ~pending[self.source]
        for src in np.unique(self.source[ready]):
            k = np.flatnonzero(ready & (self.source == src))
            r, bound, tol = self.rows[k], self.scale[k] * theta[src], self.tol
            self.open[k] = False
            if (self.lower[k] >= bound * (1 - tol)).any():
                pending[r] = False
                self.rerun.append(int(src))
                continue
            done, final = np.zeros(len(k), dtype=bool), np.zeros(len(k))
            for th, so, still in self.history:
                hit = ~done & (~still[k] | (so[k] & (th[k] >= bound * (1 - tol))))
                final[hit], done[hit] = th[k][hit], True
            theta[r[done]] = final[done]
            pending[r[done]] = False
            upper[r] = bound


def _row_dot(xp):
    """``(a, b) -> Σ_j a_ij b_ij`` of two ``(P, n)`` blocks: ``core.backend.dot_along(a, b, 1)``
    without its per-call checks (a Lanczos step makes three)."""
    if xp is np:
        return lambda a, b: np.einsum("ab,ab->a", a, b)
    return lambda a, b: (a * b).sum(axis=1)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
