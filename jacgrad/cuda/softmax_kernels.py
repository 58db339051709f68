"""Attention's softmax as CUDA kernels (``kernels/softmax.cu``, math in ``kernels/softmax.cuh``),
launched on CuPy arrays.

- ``softmax_rows(S, scale, causal, key_padding_mask=None, out=None)`` → ``P = softmax(scale·S)``
  over the last axis, keys masked by causality (key ``j`` > query ``i``, from the row index: no mask
  array) and by a ``(B, n)`` key-padding mask; a row with every key masked is all 0 (no NaN). One
  kernel reads each row of ``S`` once and writes ``P`` once (rows that fit the registers; longer
  rows read ``S`` three times), where the array expression it replaces (``attention_weights`` on
  NumPy: scale, mask, max, subtract, exp, sum, divide and the guards) is 6 to 12 kernels, and 3 more
  for a mask array.
- ``softmax_jvp(P, v, out=None)`` → ``P ⊙ (v − rowsum(P ⊙ v))`` over the last axis: every row's
  ``(diag(p) − ppᵀ)v``, the JVP and (the matrix is symmetric) the VJP of ``P = softmax(S)``. One
  kernel reads each row of ``P`` and ``v`` once (longer rows twice) and writes once, where
  ``v -= (P * v).sum(-1, keepdims=True); v *= P`` is three kernels and seven passes over the rows.

Rows fit the registers up to ``n = 4096`` float32, ``2048`` float64. The launch is the norm row
kernels' (``norm_kernels.row_launch``: a block per row, or groups of lanes for short rows). Both
are recordable in a CUDA graph: no host synchronisation, no allocation when ``out`` is given (and
the inputs are C-contiguous).

NumPy input is a ``TypeError``: ``jacgrad.tokens.attention_factor`` computes the NumPy reference
itself and calls these on CuPy arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.backend import get_xp
from ..core.cuda_build import compiled_function, source_expressions
from ..core.validation import shape_str
from . import norm_kernels

__all__ = ["softmax_jvp", "softmax_rows"]

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
    if out is not None and (tuple(out.shape) != tuple(v.shape) or out.dtype != v.dtype):
        raise ValueError(f"softmax_jvp: out is {shape_str(out.shape)} {out.dtype} but v is {shape_str(v.shape)} "
                         f"{v.dtype}: out must have v's shape and dtype (never cast silently)")
    n = int(v.shape[-1])
    inner, span = _broadcast_rows(P.shape, v.shape)
    rows = math.prod(v.shape[:-1])
    P = xp.ascontiguousarray(P)
    vc = xp.ascontiguousarray(v)
    direct = out is not None and out.flags.c_contiguous
    res = out if direct else xp.empty(v.shape, dtype=v.dtype)
    _launch("softmax_jvp", v.dtype, rows, n, (P, vc, res, np.int32(n), np.int64(rows), np.int64(inner),
                                                np.int64(span)))
    if out is not None and not direct:
        out[...] = res
        return out
    return res


def softmax_rows(S: Any, scale: float, causal: bool, key_padding_mask: Any = None, out: Any = None):
    """``P = softmax(scale·S)`` along the last axis, masked keys 0, on CuPy arrays.

    ``S: (…, T_q, n)`` float32 or float64 (``(B, h, T, T)`` in attention). ``causal``: key ``j`` of
    query ``i`` (``S``'s axis −2) is masked where ``j > i``. ``key_padding_mask: (B, n)`` bool, True =
    masked (torch's convention), ``B = S.shape[0]``: every row of sample ``b`` masks the keys of row
    ``b``. A row whose every key is masked (or whose every score is −inf) is all 0. ``out``: an array
    of S's shape and dtype to write into, ``S`` itself included (in place); C-contiguous to be
    written by the kernel directly, else the result is copied into it. Returns the result (``out``
    when given). The formula is ``attention_weights``' on NumPy, step for step."""
    xp = get_xp(S, key_padding_mask, out)
    if xp is np:
        raise TypeError("jacgrad.cuda.softmax_kernels.softmax_rows runs on CuPy arrays; the NumPy reference is "
                        "jacgrad.tokens.attention_factor.attention_weights")
    dt = np.dtype(S.dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"softmax_rows: S is {dt}; the kernel runs on float32 or float64")
    if S.ndim < (2 if causal or key_padding_mask is not None else 1):
        raise ValueError(f"softmax_rows: S has shape {shape_str(S.shape)}; a causal or key-padding mask needs "
                         f"(…, T_q, n) rows of queries")
    n = int(S.shape[-1])
    rows = math.prod(S.shape[:-1])
    pad = S
    if key_padding_mask is not None:
        if key_padding_mask.dtype != bool:
            raise TypeError(f"softmax_rows: key_padding_mask has dtype {key_padding_mask.dtype}; needs bool "
                            f"(True = masked key)")
        if tuple(key_padding_mask.shape) != (S.shape[0], n):
            raise ValueError(f"softmax_rows: key_padding_mask has shape {shape_str(key_padding_mask.shape)} but S "
                             f"is {shape_str(S.shape)}: needs ({S.shape[0]}, {n})")
        pad = xp.ascontiguousarray(key_padding_mask)
    if out is not None and (tuple(out.shape) != tuple(S.shape) or out.dtype != dt):
        raise ValueError(f"softmax_rows: out is {shape_str(out.shape)} {out.dtype} but S is {shape_str(S.shape)} "
                         f"{dt}: needs S's shape and dtype")
    Sc = xp.ascontiguousarray(S)
    direct = out is not None and out.flags.c_contiguous
    res = out if direct else xp.empty(S.shape, dtype=dt)
    queries = int(S.shape[-2]) if S.ndim >= 2 else 1
    per_sample = rows // int(S.shape[0]) if S.ndim >= 2 and S.shape[0] else 1
    _launch("softmax_rows", dt, rows, n, (Sc, res, np.int32(n), np.int64(rows), dt.type(scale),
                                          np.int64(max(queries, 1)), np.int64(max(per_sample, 1)),
                                          np.int32(1 if causal else 0), pad,
                                          np.int32(0 if key_padding_mask is None else 1)))
    if out is not None and not direct:
        out[...] = res
        return out
    return res


def _launch(kernel: str, dtype, rows: int, n: int, args: tuple) -> None:
    """One of softmax.cu's row kernels over ``rows`` rows of ``n`` (nothing when either is 0), with the
    norm row kernels' geometry (``norm_kernels.row_launch``); the threads per row appended to ``args``."""
    if not (rows and n):
        return
    grid, block, group = norm_kernels.row_launch(rows, n, np.dtype(dtype).itemsize)
    fn = compiled_function(kernel, dtype, source_expressions(SOURCE, dtype, ()))
    fn((grid,), (block,), (*args, np.int32(group)))


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
