"""Bracketings of a Jacobian chain: which sub-products to form, and forming them.

A tree is a factor index ``k`` or a pair ``(left, right)`` meaning ``left · right``: the
sub-chain ``right`` (input side) is applied first. Forward accumulation is the left-deep tree
``(K-1, (…, (1, 0)))``, reverse the right-deep ``(((K-1, K-2), …), 0)``; ``"auto"`` is the
matrix-chain dynamic programme over the widths with the batch counted: combining two
sub-products of ranges ``[i..m]`` and ``[m+1..j]`` costs ``b · w[j+1] · w[m+1] · w[i]``
multiply-adds, where ``b`` is B if a diagonal in ``[i..j]`` is per sample, else 1.

The programme is exact (the cheapest of all bracketings) up to ``EXACT_LIMIT`` = 1200 factors:
O(K³) work in NumPy sweeps, about 0.1–0.8 s at K = 1000 (``benchmarks/deep_chain.py``). Beyond,
"auto" is the cheapest of the fans through the ``_HUBS`` best hub widths (forward and reverse are
the fans at the two ends, an hourglass split the fan at its bottleneck) and the exact programme
over blocks cut at the narrowest widths — never worse than forward or reverse, not proven
optimal. Trees are built, priced and evaluated without recursion: 10,000 factors are fine.

Evaluation (``jacgrad.algebra.bracket_evaluate``, re-exported here) keeps every accumulator in the layout that makes its next step ONE GEMM against
the shared weights: a sub-product that grows on the output side is stored transposed
``(…, n_in_part, H)`` and multiplied by ``W`` as a ``(b·n_in_part, H)`` block; one that grows on
the input side is stored natural ``(…, rows, H)`` and multiplied by ``Wᵀ``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .bracket_evaluate import _is_leaf, evaluate, peel_spine, row_cost, stack_jvp, stack_vjp

__all__ = ["Plan", "evaluate", "peak_elements", "peel_spine", "plan", "row_cost", "stack_jvp", "stack_vjp"]


@dataclass(frozen=True)
class Plan:
    tree: Any
    cost: int


def plan(order: str, widths: Sequence[int], per_sample: Sequence[bool], batch: int,
         row_costs: Sequence[int] | None = None, dense_costs: Sequence[int] | None = None) -> Plan:
    """The tree for ``order`` over factors with ``widths = [n_in, H_1, …, n_out]``.

    ``row_costs[k]``/``dense_costs[k]``: for chains with structured factors (``jacgrad.algebra.factors``),
    the multiply-adds of factor k applied to one row, and of forming it densely (B counted);
    a dense factor's are ``w[k]·w[k+1]`` and 0, the model the DP has without them. A leaf
    combined with a sub-product of ``r`` rows then costs ``b·r·row_costs[k]``.
    Memoised: a training loop asks for the same plan every step."""
    c = None if row_costs is None else tuple(int(x) for x in row_costs)
    d = None if dense_costs is None else tuple(int(x) for x in dense_costs)
    return _plan(order, tuple(int(w) for w in widths), tuple(bool(p) for p in per_sample), int(batch), c, d)


@functools.lru_cache(maxsize=256)
def _plan(order: str, widths: tuple, per_sample: tuple, batch: int, c=None, d=None) -> Plan:
    if order in ("forward", "reverse"):
        tree = _spine(order, len(per_sample))
    elif c is not None and len(per_sample) > EXACT_LIMIT:  # no heuristic for structured leaves: the cheaper spine
        tree = min((_spine(o, len(per_sample)) for o in ("forward", "reverse")),
                   key=lambda t: _cost(t, widths, per_sample, batch, c, d)[2])
    else:
        tree = _optimal_tree(widths, per_sample, batch, c, d)
    return Plan(tree, _cost(tree, widths, per_sample, batch, c, d)[2])


# "auto" runs the exact DP up to EXACT_LIMIT factors (O(K³) work in NumPy sweeps); beyond, the
# cheapest of the fans through the _HUBS best hubs and the DP over at most _BLOCKS blocks.
EXACT_LIMIT = 1200
_BLOCKS = 400
_BLOCK_CAP = 100
_HUBS = 8


def _spine(order: str, K: int):
    """Forward accumulation ``(K-1, (…, (1, 0)))`` or reverse ``(((K-1, K-2), …), 0)``."""
    if order == "forward":
        tree: Any = 0
        for k in range(1, K):
            tree = (k, tree)
        return tree
    tree = K - 1
    for k in range(K - 2, -1, -1):
        tree = (tree, k)
    return tree


def _optimal_tree(w: Sequence[int], per_sample: Sequence[bool], batch: int, c=None, d=None):
    K = len(per_sample)
    if K <= EXACT_LIMIT:
        return _dp_tree(w, per_sample, batch, c=c, d=d)[0]
    trees = [_blocked_tree(w, per_sample, batch)[0]] + [_fan(v, K) for v in _best_hubs(w, _HUBS)]
    return min(trees, key=lambda t: _cost(t, w, per_sample, batch)[2])


def _fan(v: int, K: int):
    """Every factor multiplied into the hub at width ``w[v]``: the factors ``v..K-1`` forward
    from it, ``0..v-1`` reverse into it, then one product. ``v = 0`` is forward, ``v = K`` reverse."""
    out = v if v < K else None
    for k in range(v + 1, K):
        out = (k, out)
    inp = v - 1 if v > 0 else None
    for k in range(v - 2, -1, -1):
        inp = (inp, k)
    return inp if out is None else out if inp is None else (out, inp)


def _best_hubs(w: Sequence[int], n: int) -> list[int]:
    """The ``n`` hubs of cheapest fan with the batch factor left out (``_cost`` prices them):
    ``w[v]·(Σ_k w[k]w[k+1] − the two edges at v + w[0]w[K] when 0 < v < K)``; 0 and K always."""
    w = np.asarray(w, dtype=np.float64)
    K = len(w) - 1
    e = np.concatenate([[0.0], w[:-1] * w[1:], [0.0]])  # e[k+1] = w[k]w[k+1]
    fan = w * (e.sum() - e[:-1] - e[1:])
    fan[1:K] += w[1:K] * w[0] * w[K]
    return sorted({0, K, *np.argsort(fan, kind="stable")[:n].tolist()})


def _dp_tree(w, per_sample, batch: int, leaf_cost=None, leaves=None, c=None, d=None):
    """The matrix-chain DP, vectorised over the start of the range, one sweep per length.

    ``S[i, l]``: least cost of the factors ``i .. i+l-1``; ``R[j, K-l]`` the same range indexed
    by its end ``j = i+l-1`` (lengths stored reversed, so that a sweep reads it forwards). For
    the ranges of length ``L`` the candidates ``left = S[i, l]``, ``right = R[j, K-L+l]`` and the
    combining GEMM ``b(i, j)·w[i]·w[i+l]·w[j+1]`` (l = 1 .. L-1) are strided views, so each
    length is four array passes. Costs are float64 (exact below 2⁵³ multiply-adds, beyond that
    optimal to rounding); ``Plan.cost`` is recomputed in integers. ``leaf_cost``: a cost per
    factor (a block's own cost, see ``_blocked_tree``); ``leaves``: what factor ``k``'s leaf is
    in the returned tree (default ``k``); ``c``/``d``: row and dense costs of structured factors
    (see ``plan``): a split with a single leaf on one side is priced by that leaf's row action,
    and the pair of two leaves adds the input-side leaf's dense cost. Returns ``(tree, cost)``.
    """
    K = len(per_sample)
    w = np.asarray(w, dtype=np.float64)
    if c is not None:
        c, d = np.asarray(c, dtype=np.float64), np.asarray(d, dtype=np.float64)
    S = np.zeros((K, K + 1))
    R = np.zeros((K, K + 1))
    if leaf_cost is not None:
        S[:, 1] = R[:, K - 1] = leaf_cost
    split = np.zeros((K, K + 1), dtype=np.int32)  # split[i, L] = m: (i..m) then (m+1..i+L-1)
    n_ps = np.concatenate([[0], np.cumsum(np.asarray(per_sample, dtype=np.int64))])
    size = (K // 2 + 1) ** 2
    total_buf, gemm_buf = np.empty(size), np.empty(size)
    for L in range(2, K + 1):
        n, m = K - L + 1, L - 1
        starts = np.arange(n)
        bij = np.where(n_ps[L:] > n_ps[:n], float(batch), 1.0)
        coef = bij * w[:n] * w[L:]  # b(i, j)·w[i]·w[j+1]
        total = total_buf[: n * m].reshape(n, m)
        gemm = gemm_buf[: n * m].reshape(n, m)
        np.add(S[:n, 1:L], R[L - 1 : K, K - m : K], out=total)
        mid = np.lib.stride_tricks.sliding_window_view(w[1:K], m)[:n]  # w[i+l], l = 1 .. L-1
        np.multiply(mid, coef[:, None], out=gemm)
        if c is not None:  # single leaves act on the other side's rows
            gemm[:, 0] = bij * w[L:] * c[:n]  # input side is the leaf i: b·w[j+1]·c[i]
            gemm[:, m - 1] = bij * w[:n] * c[L - 1 :]  # output side is the leaf j: b·w[i]·c[j]
            if L == 2:  # two leaves: one formed densely, the other applied to its rows (the cheaper)
                gemm[:, 0] = np.minimum(gemm[:, 0] + d[:n], bij * w[2:] * c[:n] + d[1:])
        total += gemm
        best = total.argmin(axis=1)
        cost = total[starts, best]
        S[:n, L] = cost
        R[L - 1 : K, K - L] = cost
        split[:n, L] = starts + best  # m = i + l - 1 with l = best + 1
    return _build(split, K, leaves), float(S[0, K])


def _build(split, K: int, leaves=None):
    """The tree of the DP's split table, without recursion (chains can be deep)."""
    if K == 0:
        raise ValueError("no factors to bracket")
    leaf = (lambda k: k) if leaves is None else leaves.__getitem__
    done: dict[tuple[int, int], Any] = {}
    stack: list[tuple[int, int, bool]] = [(0, K - 1, False)]
    while stack:
        i, j, ready = stack.pop()
        if i == j:
            done[i, j] = leaf(i)
            continue
        m = int(split[i, j - i + 1])
        if ready:
            done[i, j] = (done.pop((m + 1, j)), done.pop((i, m)))
        else:
            stack += [(i, j, True), (m + 1, j, False), (i, m, False)]
    return done[0, K - 1]


def _blocked_tree(w: Sequence[int], per_sample: Sequence[bool], batch: int):
    """Beyond ``EXACT_LIMIT`` factors: the chain cut into about ``_BLOCKS`` blocks at its
    narrowest widths (ties spread along the chain; a block still longer than ``_BLOCK_CAP``
    cut evenly), each block bracketed by the exact DP, then the exact DP over the blocks with
    each block's cost as its leaf cost. Returns ``(tree, cost)``.

    Optimal among the bracketings that form each block's product on its own — a restriction:
    forward and reverse are not of that family, so ``_optimal_tree`` also prices the fans
    (forward and reverse among them) and keeps the cheapest."""
    K = len(per_sample)
    pos = np.arange(1, K)  # a cut before factor c sits at width w[c]
    spread = (pos * 0.6180339887498949) % 1.0  # equal widths: cuts spread evenly, not bunched
    narrowest = np.lexsort((spread, np.asarray(w[1:K], dtype=np.float64)))[: _BLOCKS - 1]
    cuts = [int(c) for c in np.unique(np.concatenate([[0, K], pos[narrowest]]))]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a > _BLOCK_CAP:
            cuts += range(a + _BLOCK_CAP, b, _BLOCK_CAP)
    cuts.sort()
    trees, costs = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        tree, cost = _dp_tree(w[a : b + 1], per_sample[a:b], batch, leaves=range(a, b))
        trees.append(tree)
        costs.append(cost)
    block_ps = [any(per_sample[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return _dp_tree([w[c] for c in cuts], block_ps, batch, leaf_cost=costs, leaves=trees)


def _cost(node, w, per_sample, batch, c=None, d=None) -> tuple[int, int, int]:
    """(first factor, last factor, multiply-adds) of a tree under the DP's cost model (``c``/``d``
    as for ``_dp_tree``)."""
    n_ps = [0]  # n_ps[k]: per-sample factors before k, so a span's test is O(1)
    for p in per_sample:
        n_ps.append(n_ps[-1] + bool(p))
    stack = [node]
    out: dict[int, tuple[int, int, int]] = {}
    while stack:  # post-order without recursion: chains can be deep
        n = stack[-1]
        if _is_leaf(n):
            out[id(n)] = (n, n, 0)
            stack.pop()
            continue
        left, right = n
        if id(left) in out and id(right) in out:
            li, lj, lc = out[id(left)]
            ri, rj, rc = out[id(right)]
            b = batch if n_ps[lj + 1] > n_ps[ri] else 1
            if c is not None and _is_leaf(left) and _is_leaf(right):
                gemm = min(b * w[ri] * c[left] + d[right], b * w[lj + 1] * c[right] + d[left])
            elif c is not None and _is_leaf(left):
                gemm = b * w[ri] * c[left]
            elif c is not None and _is_leaf(right):
                gemm = b * w[lj + 1] * c[right]
            else:
                gemm = b * w[lj + 1] * w[rj + 1] * w[ri]
            out[id(n)] = (ri, lj, lc + rc + gemm)
            stack.pop()
        else:
            stack.extend(x for x in (left, right) if id(x) not in out)
    return out[id(node)]


def peak_elements(node, w: Sequence[int]) -> int:
    """Elements of the largest array ``evaluate`` forms for one sample on a chain of dense factors
    (``w = [n_in, H_1, …, n_out]``): every node's sub-product, ``w[j+1]·w[i]`` over its factor
    range ``[i..j]``, and the one leaf each spine forms densely, its innermost (a pair of leaves
    forms its left one when a spine of leaves applied on the input side reached it, else its right
    one; the spine's other leaves are applied to the accumulator, never formed).

        >>> peak_elements(((2, 1), 0), [784, 256, 256, 10])  # J_2 formed (10, 256), then (10, 256), (10, 784)
        7840
    """
    if _is_leaf(node):
        return int(w[node + 1] * w[node])
    span: dict[int, tuple[int, int]] = {}
    peak, stack = 0, [(node, False)]  # (node, whether an input-side spine reached it)
    while stack:  # post-order without recursion: chains can be deep
        n, input_spine = stack[-1]
        left, right = n
        todo = [(x, x is left and _is_leaf(right)) for x in (left, right) if not _is_leaf(x) and id(x) not in span]
        if todo:
            stack.extend(todo)
            continue
        if _is_leaf(left) and _is_leaf(right):
            k = left if input_spine else right
            peak = max(peak, w[k + 1] * w[k])
        lo = right if _is_leaf(right) else span[id(right)][0]
        hi = left if _is_leaf(left) else span[id(left)][1]
        span[id(n)] = (lo, hi)
        peak = max(peak, w[hi + 1] * w[lo])
        stack.pop()
    return int(peak)
