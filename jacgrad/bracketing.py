"""Bracketings of a Jacobian chain: which sub-products to form, and forming them.

A tree is a factor index ``k`` or a pair ``(left, right)`` meaning ``left · right``: the
sub-chain ``right`` (input side) is applied first. Forward accumulation is the left-deep tree
``(K-1, (…, (1, 0)))``, reverse the right-deep ``(((K-1, K-2), …), 0)``; ``"auto"`` is the
matrix-chain dynamic programme over the widths with the batch counted: combining two
sub-products of ranges ``[i..m]`` and ``[m+1..j]`` costs ``b · w[j+1] · w[m+1] · w[i]``
multiply-adds, where ``b`` is B if a diagonal in ``[i..j]`` is per sample, else 1.

Evaluation keeps every accumulator in the layout that makes its next step ONE GEMM against
the shared weights: a sub-product that grows on the output side is stored transposed
``(…, n_in_part, H)`` and multiplied by ``W`` as a ``(b·n_in_part, H)`` block; one that grows on
the input side is stored natural ``(…, rows, H)`` and multiplied by ``Wᵀ``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from .backend import get_xp

__all__ = ["Plan", "evaluate", "peel_spine", "plan"]


@dataclass(frozen=True)
class Plan:
    tree: Any
    cost: int


def _is_leaf(node) -> bool:
    return isinstance(node, int)


def plan(order: str, widths: Sequence[int], per_sample: Sequence[bool], batch: int) -> Plan:
    """The tree for ``order`` over factors with ``widths = [n_in, H_1, …, n_out]``.

    Memoised: a training loop asks for the same plan every step."""
    return _plan(order, tuple(int(w) for w in widths), tuple(bool(p) for p in per_sample), int(batch))


@functools.lru_cache(maxsize=256)
def _plan(order: str, widths: tuple, per_sample: tuple, batch: int) -> Plan:
    K = len(per_sample)
    if order == "forward":
        tree: Any = 0
        for k in range(1, K):
            tree = (k, tree)
    elif order == "reverse":
        tree = K - 1
        for k in range(K - 2, -1, -1):
            tree = (tree, k)
    else:
        tree = _optimal_tree(widths, per_sample, batch)
    return Plan(tree, _cost(tree, widths, per_sample, batch)[2])


def _optimal_tree(w: Sequence[int], per_sample: Sequence[bool], batch: int):
    K = len(per_sample)
    # batched[i][j]: some diagonal in factors i..j is per sample
    batched = [[False] * K for _ in range(K)]
    for i in range(K):
        acc = False
        for j in range(i, K):
            acc = acc or per_sample[j]
            batched[i][j] = acc
    cost = [[0] * K for _ in range(K)]
    split = [[0] * K for _ in range(K)]
    for length in range(2, K + 1):
        for i in range(K - length + 1):
            j = i + length - 1
            b = batch if batched[i][j] else 1
            best, best_m = None, i
            for m in range(i, j):
                c = cost[i][m] + cost[m + 1][j] + b * w[j + 1] * w[m + 1] * w[i]
                if best is None or c < best:
                    best, best_m = c, m
            cost[i][j], split[i][j] = best, best_m

    def build(i: int, j: int):
        if i == j:
            return i
        m = split[i][j]
        return (build(m + 1, j), build(i, m))

    return build(0, K - 1)


def _cost(node, w, per_sample, batch) -> tuple[int, int, int]:
    """(first factor, last factor, multiply-adds) of a tree under the DP's cost model."""
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
            b = batch if any(per_sample[ri : lj + 1]) else 1
            out[id(n)] = (ri, lj, lc + rc + b * w[lj + 1] * w[rj + 1] * w[ri])
            stack.pop()
        else:
            stack.extend(x for x in (left, right) if id(x) not in out)
    return out[id(node)]


def peel_spine(node, side: int) -> tuple[list[int], Any]:
    """The leaves hanging off one side of ``node``'s spine, outermost first, and the sub-tree
    they wrap. ``side=0``: a left spine (leaves applied after, on the output side); ``side=1``:
    a right spine (leaves applied first, on the input side). Iterative: chains can be deep."""
    spine = []
    while not _is_leaf(node) and _is_leaf(node[side]):
        spine.append(node[side])
        node = node[1 - side]
    return spine, node


def evaluate(node, factors, transposed: bool):
    """The product the tree stands for: ``(…, n_out_part, n_in_part)``, or its transpose."""
    if _is_leaf(node):
        return factors[node].dense(transposed=transposed)
    left, right = node
    if _is_leaf(left):  # a left spine: leaves applied one after another on the output side
        spine, inner = peel_spine(node, 0)
        acc_t = evaluate(inner, factors, transposed=True)
        for k in reversed(spine):
            acc_t = _apply_after(factors[k], acc_t)
        return acc_t if transposed else acc_t.swapaxes(-1, -2)
    if _is_leaf(right):  # a right spine: leaves applied one after another on the input side
        spine, inner = peel_spine(node, 1)
        acc = evaluate(inner, factors, transposed=False)
        for k in reversed(spine):
            acc = _apply_before(acc, factors[k])
        return acc.swapaxes(-1, -2) if transposed else acc
    if transposed:
        return evaluate(right, factors, True) @ evaluate(left, factors, True)
    return evaluate(left, factors, False) @ evaluate(right, factors, False)


def _apply_after(J, acc_t):
    """``(J · P)ᵀ`` from ``Pᵀ: (…, a, H_in)``: one GEMM ``(b·a, H_in) @ W`` then the diagonal."""
    xp = get_xp(acc_t)
    acc_t = xp.ascontiguousarray(acc_t)
    t = (acc_t.reshape(-1, J.h_in) @ J.W).reshape(acc_t.shape[:-1] + (J.h_out,))
    return J.scale_stack(t, inplace=True)


def _apply_before(acc, J):
    """``P · J`` from ``P: (…, r, H_out)``: the diagonal, then one GEMM ``(b·r, H_out) @ Wᵀ``."""
    xp = get_xp(acc)
    s = xp.ascontiguousarray(J.scale_stack(acc, inplace=True))
    return (s.reshape(-1, J.h_out) @ J.W.T).reshape(s.shape[:-1] + (J.h_in,))
