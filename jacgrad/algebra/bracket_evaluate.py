"""Forming the product a bracketing tree names (``jacgrad.algebra.bracketing`` chooses the tree).

A tree is a factor index ``k`` or a pair ``(left, right)`` meaning ``left · right``. Evaluation
keeps every accumulator in the layout that makes its next step ONE GEMM against the shared
weights: a sub-product that grows on the output side is stored transposed ``(…, n_in_part, H)``
and multiplied by ``W`` as a ``(b·n_in_part, H)`` block; one that grows on the input side is
stored natural ``(…, rows, H)`` and multiplied by ``Wᵀ``. Trees of any depth evaluate without
recursion.

    >>> import numpy as np
    >>> from jacgrad import LayerJacobian
    >>> J = LayerJacobian(np.array([2.0, 3.0]), np.eye(2))
    >>> evaluate((1, 0), [J, J], transposed=False)
    array([[4., 0.],
           [0., 9.]])
"""

from __future__ import annotations

import math
from typing import Any

from ..cuda.gemm import matmul
from ..core.backend import get_xp
from .jacobian import LayerJacobian

__all__ = ["evaluate", "peel_spine", "row_cost", "stack_jvp", "stack_vjp"]


def _is_leaf(node) -> bool:
    return isinstance(node, int)


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
    """The product the tree stands for: ``(…, n_out_part, n_in_part)``, or its transpose.

    Each sub-tree is a generator (``_evaluate``) that yields the sub-trees it needs; this loop
    drives them from an explicit stack, so a tree of any depth evaluates without recursion."""
    stack = [_evaluate(node, factors, transposed)]
    value = None
    while stack:
        try:
            request = stack[-1].send(value)
        except StopIteration as done:
            stack.pop()
            value = done.value
        else:
            stack.append(_evaluate(request[0], factors, request[1]))
            value = None
    return value


def _evaluate(node, factors, transposed: bool):
    """One tree node: yields ``(sub_tree, transposed)`` for each operand, returns the product."""
    if _is_leaf(node):
        return factors[node].dense(transposed=transposed)
    left, right = node
    if _is_leaf(left) and _is_leaf(right) and _structured(factors, node) and _form_output_side(factors[left], factors[right]):
        acc = _apply_before(factors[left].dense(), factors[right])  # as _cost prices a structured pair
        return acc.swapaxes(-1, -2) if transposed else acc
    if _is_leaf(left):  # a left spine: leaves applied one after another on the output side
        spine, inner = peel_spine(node, 0)
        if len(spine) > 1 and _is_leaf(inner) and _structured(factors, (spine[-1], inner)):
            inner = (spine.pop(), inner)  # a structured pair: evaluated as priced, above
        acc_t = yield inner, True
        for k in reversed(spine):
            acc_t = _apply_after(factors[k], acc_t)
        return acc_t if transposed else acc_t.swapaxes(-1, -2)
    if _is_leaf(right):  # a right spine: leaves applied one after another on the input side
        spine, inner = peel_spine(node, 1)
        if _is_leaf(inner) and _structured(factors, (inner, spine[-1])):
            inner = (inner, spine.pop())  # a structured pair: evaluated as priced, above
        acc = yield inner, False
        for k in reversed(spine):
            acc = _apply_before(acc, factors[k])
        return acc.swapaxes(-1, -2) if transposed else acc
    if transposed:
        r = yield right, True
        return matmul(r, (yield left, True))
    left_value = yield left, False
    return matmul(left_value, (yield right, False))


def row_cost(J) -> int:
    """Multiply-adds of one factor applied to one row: ``H_in·H_out`` for ``diag(d)·Wᵀ``; a
    structured factor (``jacgrad.algebra.factors``) states its own ``row_cost``."""
    return J.h_in * J.h_out if isinstance(J, LayerJacobian) else int(J.row_cost)


def stack_jvp(J, a):
    """``J`` applied to every row of ``a: (…, r, H_in)`` -> ``(…, r, H_out)`` (B leads when
    ``J`` is per sample); ``a`` may be overwritten."""
    return _apply_after(J, a)


def stack_vjp(J, a):
    """``Jᵀ`` applied to every row of ``a: (…, r, H_out)`` -> ``(…, r, H_in)``; ``a`` may be overwritten."""
    return _apply_before(a, J)


def _structured(factors, pair) -> bool:
    return not all(isinstance(factors[k], LayerJacobian) for k in pair)


def _form_output_side(Jo, Ji) -> bool:
    """For the pair ``Jo·Ji``: whether forming ``Jo`` and applying ``Ji`` to its rows is cheaper
    than forming ``Ji`` and applying ``Jo`` (``_cost``'s choice; ties: form the input side)."""
    b = max(Jo.batch or 1, Ji.batch or 1)
    dense = [0 if isinstance(J, LayerJacobian) else J.dense_cost for J in (Jo, Ji)]
    return b * Jo.h_out * row_cost(Ji) + dense[0] < b * Ji.h_in * row_cost(Jo) + dense[1]


def _apply_after(J, acc_t):
    """``(J · P)ᵀ`` from ``Pᵀ: (…, a, H_in)``: one GEMM ``(b·a, H_in) @ W`` then the diagonal."""
    if not isinstance(J, LayerJacobian):
        return J.jvp_stack(acc_t)
    xp = get_xp(acc_t)
    acc_t = xp.ascontiguousarray(acc_t)
    rows = math.prod(acc_t.shape[:-1])  # not -1: a zero-width factor makes the block empty
    t = matmul(acc_t.reshape(rows, J.h_in), J.W).reshape(acc_t.shape[:-1] + (J.h_out,))
    return J.scale_stack(t, inplace=True)


def _apply_before(acc, J):
    """``P · J`` from ``P: (…, r, H_out)``: the diagonal, then one GEMM ``(b·r, H_out) @ Wᵀ``."""
    if not isinstance(J, LayerJacobian):
        return J.vjp_stack(acc)
    xp = get_xp(acc)
    s = xp.ascontiguousarray(J.scale_stack(acc, inplace=True))
    rows = math.prod(s.shape[:-1])
    return matmul(s.reshape(rows, J.h_out), J.W.T).reshape(s.shape[:-1] + (J.h_in,))
