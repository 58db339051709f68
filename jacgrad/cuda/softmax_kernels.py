"""The softmax Jacobian's product as one CUDA kernel (``kernels/softmax.cu``, math in
``kernels/softmax.cuh``), launched on CuPy arrays.

``softmax_jvp(P, v, out=None)`` → ``P ⊙ (v − rowsum(P ⊙ v))`` over the last axis: every row's
``(diag(p) − ppᵀ)v``, the JVP and (the matrix is symmetric) the VJP of ``P = softmax(S)``. One
kernel reads each row of ``P`` and ``v`` once (rows that fit the registers: ``n ≤ 4096`` float32,
``2048`` float64; longer rows twice) and writes once, where the array expression it replaces
(``v -= (P * v).sum(-1, keepdims=True); v *= P``) is three kernels and seven passes over the rows.
The launch is the norm row kernels' (``norm_kernels.block_threads``: a block per row, or groups
of lanes for short rows), recordable in a CUDA graph (no host synchronisation, no allocation when
``out`` is given).

NumPy input is a ``TypeError``: ``jacgrad.tokens.attention_factor`` computes the NumPy reference
itself and calls this on CuPy arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.backend import get_xp
from ..core.cuda_build import compiled_function, source_expressions
from . import norm_kernels

__all__ = ["softmax_jvp"]

SOURCE = "softmax.cu"


def softmax_jvp(P: Any, v: Any, out: Any = None):
    """``P ⊙ (v − rowsum(P ⊙ v))`` along the last axis, on CuPy arrays.

    ``v: (…, n)``; ``P: (…, n)`` of v's dtype, broadcasting against v to v's shape over at most one
    run of consecutive leading axes (``(B, 1, h, T, T)`` against a stack ``(B, r, h, T, T)``, or
    ``(B, h, T, T)`` against ``(r, B, h, T, T)``): its rows are read where they repeat, not copied;
    any other broadcast is a ``ValueError``. ``out``: an array of v's shape and
    dtype to write into, ``v`` itself included (in place); C-contiguous to be written by the kernel
    directly, else the result is copied into it. Returns the result (``out`` when given)."""
    xp = get_xp(P, v)
    if xp is np:
        raise TypeError("jacgrad.cuda.softmax_kernels.softmax_jvp runs on CuPy arrays; the NumPy reference is "
                        "jacgrad.tokens.attention_factor._softmax_jvp")
    if P.dtype != v.dtype:
        raise TypeError(f"softmax_jvp: P is {P.dtype} but v is {v.dtype}; the fused kernel runs in one dtype: "
                        f"cast one so they agree")
    n = int(v.shape[-1])
    inner, span = _broadcast_rows(P.shape, v.shape)
    rows = math.prod(v.shape[:-1])
    P = xp.ascontiguousarray(P)
    vc = xp.ascontiguousarray(v)
    direct = out is not None and out.shape == v.shape and out.dtype == v.dtype and out.flags.c_contiguous
    res = out if direct else xp.empty(v.shape, dtype=v.dtype)
    if rows and n:
        group, block = norm_kernels.block_threads(n, v.dtype.itemsize)
        grid = min(-(-rows // (block // group)), norm_kernels._MAX_GRID)
        fn = compiled_function("softmax_jvp", v.dtype, source_expressions(SOURCE, v.dtype, ()))
        fn((grid,), (block,), (P, vc, res, np.int32(n), np.int64(rows), np.int64(inner), np.int64(span),
                               np.int32(group)))
    if out is not None and not direct:
        out[...] = res
        return out
    return res


def _broadcast_rows(p_shape: tuple, v_shape: tuple) -> tuple[int, int]:
    """``(inner, span)`` such that v's row ``r`` reads P's row ``(r // span)·inner + r % inner``
    (kernels/softmax.cuh's ``p_row``): v's leading axes as ``(outer, rep, inner)`` around the one run
    of axes P broadcasts over, ``span = rep·inner`` (``span == inner``: P has v's rows)."""
    p_shape, v_shape = tuple(int(k) for k in p_shape), tuple(int(k) for k in v_shape)
    while len(p_shape) > len(v_shape) and p_shape[0] == 1:  # leading unit axes broadcast like absent ones
        p_shape = p_shape[1:]
    ok = 0 < len(p_shape) <= len(v_shape) and p_shape[-1] == v_shape[-1]
    lead_v = v_shape[:-1]
    lead_p = (1,) * (len(v_shape) - len(p_shape)) + p_shape[:-1] if ok else ()
    spread = [k for k, (a, b) in enumerate(zip(lead_p, lead_v)) if a != b]
    ok = ok and all(lead_p[k] == 1 for k in spread) and (not spread or spread[-1] - spread[0] == len(spread) - 1)
    if not ok:
        raise ValueError(f"softmax_jvp: P {p_shape} must broadcast to v's shape {v_shape} over at most one run of "
                         f"consecutive leading axes (P's rows repeated, not copied); broadcast P yourself otherwise")
    if not spread:
        inner = max(1, math.prod(lead_v))
        return inner, inner
    inner = max(1, math.prod(lead_v[spread[-1] + 1:]))
    return inner, inner * math.prod(lead_v[spread[0]:spread[-1] + 1])
