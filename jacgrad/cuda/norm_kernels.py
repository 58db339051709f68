"""The normalisation layers' GPU steps: one fused CUDA kernel each (``kernels/norm.cu``, math in
``kernels/norm.cuh``), launched on CuPy arrays.

- ``forward(x, gamma, beta, eps, centered)``  → ``(y, x̂, inv)``: LayerNorm (``centered``) or
  RMSNorm of the rows of ``x (B, n)`` in one kernel (one block, or for short rows a group of
  lanes, per row).
- ``project(a, xhat, gamma, inv, centered, transpose)`` → the factor ``diag(γ·inv)·P`` (JVP) or
  its transpose ``P·diag(γ·inv)`` (VJP) on rows, ``P = I − 11ᵀ/n − x̂x̂ᵀ/n`` (``I − x̂x̂ᵀ/n``):
  one read of ``a`` and ``x̂``, one write.
- ``backward(g, xhat, inv, gamma, centered, dgamma, dbeta, sq, input_grad)`` → ``∂L/∂x``, the
  per-sample squared gradient norms, ``∂γ = Σ_batch g⊙x̂`` and ``∂β = Σ_batch g``. Rows that fit
  the registers (``row_fits``: ``n ≤ 4096`` float32, ``2048`` float64) take ONE kernel that reads
  ``g`` and ``x̂`` once: each group of threads keeps its row in registers, and its columns' sums of
  ``g⊙x̂`` and ``g`` over the ``≥ _ROWS_PER_GROUP`` rows it walks, written once as its row of
  ``(G, n)`` partials that CuPy sums (``4·G·n`` of traffic against ``3·B·n``: ≤ 8 %). Longer rows
  take the row kernel (streaming ``g`` and ``x̂`` twice) and a column kernel that reads them once
  more (coalesced, chunks of rows per block, the ``(chunks, n)`` partials summed by CuPy).

Traffic (``B·n`` values moved; kernels/norm.cuh's account): forward 3 (read x, write y and x̂),
product 3, backward 3 (read g and x̂, write ∂x) for rows that fit; forward 5, product 5,
backward 7 beyond. Not a GEMV for the column sums: ``∂β = gᵀ1`` is one, but ``∂γ``
  is the diagonal of ``gᵀx̂``, which a GEMV reaches only through a materialised ``g⊙x̂`` (an
  extra ``(B, n)`` write and read); not atomics in the row kernel: their order, hence the
  float sums, would change from run to run.

NumPy arrays are not handled here: on NumPy, ``jacgrad.nn.layers`` (``_Norm``) and
``jacgrad.algebra.factors`` (``NormFactor``) compute with NumPy, the reference these kernels are tested
against. Every function here raises ``TypeError`` on NumPy input (no silent fallback).
All four kernels of a dtype live in one module (``jacgrad.core.cuda_build``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.cuda_build import compiled_function, source_expressions
from ..core.backend import get_xp

__all__ = ["MAX_THREADS", "backward", "block_threads", "forward", "param_chunks", "project", "row_fits", "row_launch"]

SOURCE = "norm.cu"
MAX_THREADS = 256  # threads per row's block (a multiple of 32, ≤ 256: kernels/norm.cu's JG_NORM_BOUNDS)
_SHARED_BLOCK = 128  # threads per block when several short rows share it (kernels/norm.cuh's DeviceGroup)
_MAX_GRID = 1 << 20  # blocks; the kernels loop over the rows beyond
_COLUMN_THREADS = 256
_COLUMN_BLOCKS = 1024  # the column kernel's target grid: several waves on any current GPU
_MIN_CHUNK = 16
_CACHE_PACKS = 4  # 16-byte packs per operand a thread holds in registers: kernels/norm.cuh's RowCache
_ROWS_PER_GROUP = 16  # fused backward: rows a group walks before writing its (n,) partials
_MAX_GROUPS = 4096  # fused backward: row groups at most (the partials (G, n) CuPy sums)


def block_threads(n: int, itemsize: int) -> tuple[int, int]:
    """``(threads per row, threads per block)`` of the row kernels: one thread per 16-byte pack of
    the row, rounded up to a power of two up to 256; a row of 32 packs or more takes a whole block,
    shorter rows share blocks of ``_SHARED_BLOCK`` threads (groups of lanes, no idle warps)."""
    packs = -(-int(n) // max(1, 16 // int(itemsize)))
    group = min(MAX_THREADS, 1 << max(0, packs - 1).bit_length())
    return group, (group if group >= 32 else _SHARED_BLOCK)


def row_fits(n: int, itemsize: int) -> bool:
    """Whether a row of ``n`` is held in its group's registers (kernels/norm.cuh's ``row_fits``):
    ``ceil(n / V) ≤ 4 · (threads per row)``, V = 16 / itemsize. Then the row kernels read each
    operand once and the backward fuses the column sums."""
    group, _ = block_threads(n, itemsize)
    return -(-int(n) // max(1, 16 // int(itemsize))) <= _CACHE_PACKS * group


def param_chunks(rows: int, n: int) -> tuple[int, int]:
    """``(chunks, rows per chunk)`` of the column kernel: about ``_COLUMN_BLOCKS`` blocks, at least
    ``_MIN_CHUNK`` rows each (fewer partials than that are not worth their sum)."""
    col_blocks = -(-int(n) // _COLUMN_THREADS)
    chunks = max(1, min(-(-int(rows) // _MIN_CHUNK), -(-_COLUMN_BLOCKS // col_blocks), 65535))
    chunk = -(-int(rows) // chunks)
    return -(-int(rows) // chunk), chunk


def _cupy_only(where: str, *arrays):
    xp = get_xp(*arrays)
    if xp is np:
        raise TypeError(f"jacgrad.cuda.norm_kernels.{where} runs on CuPy arrays; NumPy input goes through "
                        f"jacgrad.nn.layers / jacgrad.algebra.factors, the NumPy reference")
    return xp


def _kernel(name: str, dtype):
    return compiled_function(name, dtype, source_expressions(SOURCE, dtype, ()))


def row_launch(rows: int, n: int, itemsize: int) -> tuple[int, int, int]:
    """``(grid, threads per block, threads per row)`` of a row kernel (kernels/rows.cuh's ``on_rows``)
    over ``rows ≥ 1`` rows of ``n``: ``block_threads``' groups, enough blocks for every row up to
    ``_MAX_GRID`` (the kernels loop over the rows beyond). The norm and softmax row kernels' one launch."""
    group, block = block_threads(n, itemsize)
    return min(-(-int(rows) // (block // group)), _MAX_GRID), block, group


def _launch(name: str, dtype, rows: int, n: int, args: tuple) -> None:
    """A row kernel over ``rows`` rows of ``n``: its last argument, the threads per row, appended."""
    if rows == 0:
        return
    grid, block, group = row_launch(rows, n, np.dtype(dtype).itemsize)
    _kernel(name, dtype)((grid,), (block,), (*args, np.int32(group)))


def _flag(b: bool):
    return np.int32(1 if b else 0)


def forward(x: Any, gamma: Any, beta: Any, eps: float, centered: bool, out: Any = None):
    """``x: (B, n)``, ``gamma, beta: (n,)`` (``beta`` None for RMSNorm) → ``(y (B, n), x̂ (B, n),
    inv (B,))``, ``inv = 1/σ`` (``1/r``), in x's dtype; gamma and beta of another dtype are a
    ``TypeError`` (NumPy would promote y alone). ``out``: ``(y, x̂, inv)`` buffers to write into
    (C-contiguous, x's dtype), else fresh ones."""
    xp = _cupy_only("forward", x, gamma, beta)
    dt = x.dtype
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and p.dtype != dt:
            raise TypeError(f"norm forward: x is {dt} but {name} is {p.dtype}; the fused kernel runs in one "
                            f"dtype: cast one so they agree")
    x, gamma = xp.ascontiguousarray(x), xp.ascontiguousarray(gamma)
    beta_ = gamma if beta is None else xp.ascontiguousarray(beta)
    rows, n = x.shape
    if out is not None:
        y, xhat, inv = out
        for name, buf, shape in (("y", y, (rows, n)), ("xhat", xhat, (rows, n)), ("inv", inv, (rows,))):
            if tuple(buf.shape) != shape or buf.dtype != dt or not buf.flags.c_contiguous:
                raise ValueError(f"norm forward: the {name} buffer is {tuple(buf.shape)} {buf.dtype}; needs a "
                                 f"C-contiguous {shape} {dt}")
    else:
        y, xhat, inv = xp.empty_like(x), xp.empty_like(x), xp.empty(rows, dtype=dt)
    _launch("norm_forward", dt, rows, n, (x, gamma, beta_, y, xhat, inv, np.int32(n), np.int64(rows),
                                          dt.type(eps), _flag(centered), _flag(beta is not None)))
    return y, xhat, inv


def _rows_of(a, xhat, stack: bool):
    """(a as rows, out shape, rows, a_rows, per_sample) for the factor on ``a: (…, n)``: per sample
    (``xhat (B, n)``) a's leading axes broadcast against ``(B,)`` (plain rows) or ``(B, 1)`` (a stack)."""
    xp, n = get_xp(a), a.shape[-1]
    lead = a.shape[:-1]
    if xhat.ndim == 1:
        rows = math.prod(lead)
        return xp.ascontiguousarray(a).reshape(rows, n), a.shape, rows, rows, max(rows, 1)
    B = xhat.shape[0]
    out_lead = np.broadcast_shapes(lead, (B, 1) if stack else (B,))
    if len(out_lead) > 2:
        raise ValueError(f"rows of shape {a.shape}: a per-sample factor with B={B} takes (B, n) rows or "
                         f"(B, r, n) / (r, n) stacks")
    r = out_lead[1] if stack else 1
    rows = B * r
    if lead == out_lead:
        a_rows = rows
    elif math.prod(lead) == r:  # one stack (r, n) or (1, r, n) shared by every sample: read, not copied
        a_rows = r
    else:
        a, a_rows = xp.broadcast_to(a, out_lead + (n,)), rows
    return xp.ascontiguousarray(a).reshape(a_rows, n), out_lead + (n,), rows, a_rows, max(r, 1)


def project(a: Any, xhat: Any, gamma: Any, inv: Any, centered: bool, transpose: bool, stack: bool = False,
            out: Any = None):
    """``diag(γ·inv)·P`` on the rows of ``a`` (``transpose``: ``P·diag(γ·inv)``, the VJP).

    ``xhat: (B, n)`` with ``inv: (B,)`` per sample, or ``(n,)`` with 0-d ``inv`` shared.
    Per sample, ``a: (B, n)``, or with ``stack`` ``(B, r, n)`` / ``(r, n)`` (every sample's) →
    ``(B, r, n)``; shared, any ``(…, n)`` → the same shape. dtype: the inputs' common one.
    ``out``: an array of the result's shape and dtype to write into (not ``a``); the kernel
    writes it directly when it is C-contiguous, else the result is copied into it."""
    xp = _cupy_only("project", a, xhat, gamma, inv)
    dt = np.result_type(a.dtype, xhat.dtype, gamma.dtype, inv.dtype)
    a2, shape, rows, a_rows, per_sample = _rows_of(a.astype(dt, copy=False), xhat, stack)
    n = shape[-1]
    xhat, gamma, inv = (xp.ascontiguousarray(t.astype(dt, copy=False)) for t in (xhat, gamma, inv))
    direct = out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dt and out.flags.c_contiguous
    res = out.reshape(rows, n) if direct else xp.empty((rows, n), dtype=dt)
    _launch("norm_product", dt, rows if n else 0, n,
            (a2, xhat, gamma, inv, res, np.int32(n), np.int64(rows), np.int64(max(a_rows, 1)),
             np.int64(per_sample), _flag(centered), _flag(transpose)))
    if direct:
        return out
    if out is not None:
        out[...] = res.reshape(shape)
        return out
    return res.reshape(shape)


def backward(g: Any, xhat: Any, inv: Any, gamma: Any, centered: bool, dgamma: Any, dbeta: Any = None,
             sq: Any = None, input_grad: bool = True, dx_out: Any = None):
    """The norm layer's backward on ``g = ∂L/∂y: (B, n)``: writes ``∂γ`` into ``dgamma (n,)`` (None: no parameters, nothing written) and
    (LayerNorm) ``∂β`` into ``dbeta (n,)``; adds each sample's ``‖g_i⊙x̂_i‖² (+ ‖g_i‖²)`` to
    ``sq (B,)`` when given; returns ``∂L/∂x (B, n)`` (written into ``dx_out`` when given and
    C-contiguous of the result's dtype, else fresh), or None without ``input_grad``."""
    xp = _cupy_only("backward", g, xhat, inv, gamma)
    dt = np.result_type(g.dtype, xhat.dtype, inv.dtype, gamma.dtype)  # ∂x's dtype, as NumPy's g * x̂ · (γ·inv)
    g, xhat, inv, gamma = (xp.ascontiguousarray(t.astype(dt, copy=False)) for t in (g, xhat, inv, gamma))
    rows, n = g.shape
    with_beta = dbeta is not None
    dx = None
    if input_grad:
        usable = dx_out is not None and dx_out.shape == g.shape and dx_out.dtype == dt and dx_out.flags.c_contiguous
        dx = dx_out if usable else xp.empty_like(g)
    acc = None
    if sq is not None:
        acc = sq if (sq.dtype == dt and sq.flags.c_contiguous) else xp.zeros(rows, dtype=dt)
    fuse = rows > 0 and n > 0 and row_fits(n, np.dtype(dt).itemsize)
    if fuse:
        _fused_backward(xp, g, xhat, gamma, inv, dx, acc, dgamma, dbeta, rows, n, centered)
    elif input_grad or sq is not None:
        _launch("norm_backward", dt, rows, n,
                (g, xhat, gamma, inv, g if dx is None else dx, inv if acc is None else acc, g, g, np.int32(n),
                 np.int64(rows), _flag(centered), _flag(input_grad), _flag(sq is not None), _flag(with_beta),
                 _flag(False)))
    if acc is not None and acc is not sq:
        sq += acc
    if not fuse:
        _param_grads(xp, g, xhat, dgamma, dbeta, rows, n)
    if dx is not None and dx_out is not None and dx is not dx_out:
        dx_out[...] = dx
        return dx_out
    return dx


def _column_partials(xp, dgamma, dbeta, parts: int, n: int, dt):
    """``(part_g, part_b, finish)``: where a kernel writes the ``(parts, n)`` column partials of
    ``dgamma`` and ``dbeta`` (``dbeta`` None: ``part_b`` is ``part_g``, which the kernel then leaves
    alone), and ``finish()``, which sums them into ``dgamma``/``dbeta``. One part into a contiguous
    output of the kernel's dtype is written there directly (a ``(1, n)`` view), with nothing to sum."""

    def target(out):  # (where the kernel writes, whether its partials still need their sum)
        if parts == 1 and out.dtype == dt and out.flags.c_contiguous:
            return out.reshape(1, n), False
        return xp.empty((parts, n), dtype=dt), True

    part_g, sum_g = target(dgamma)
    part_b, sum_b = (part_g, False) if dbeta is None else target(dbeta)

    def finish() -> None:
        if sum_g:
            part_g.sum(axis=0, out=dgamma)
        if sum_b:
            part_b.sum(axis=0, out=dbeta)

    return part_g, part_b, finish


def _fused_backward(xp, g, xhat, gamma, inv, dx, acc, dgamma, dbeta, rows: int, n: int, centered: bool) -> None:
    """The one-kernel backward (rows that fit): ``G`` row groups of ``≥ _ROWS_PER_GROUP`` rows each,
    their ``(G, n)`` column partials summed into ``dgamma``/``dbeta`` (written directly when G = 1)."""
    dt = g.dtype
    group, block = block_threads(n, np.dtype(dt).itemsize)
    per_block = block // group
    wanted = max(1, min(-(-rows // _ROWS_PER_GROUP), _MAX_GROUPS))
    grid = min(-(-wanted // per_block), _MAX_GRID)
    groups = grid * per_block
    part_g, part_b, finish = _column_partials(xp, dgamma, dbeta, groups, n, dt)
    _kernel("norm_backward", dt)(
        (grid,), (block,),
        (g, xhat, gamma, inv, g if dx is None else dx, inv if acc is None else acc, part_g, part_b, np.int32(n),
         np.int64(rows), _flag(centered), _flag(dx is not None), _flag(acc is not None), _flag(dbeta is not None),
         _flag(True), np.int32(group)))
    finish()


def _param_grads(xp, g, xhat, dgamma, dbeta, rows: int, n: int) -> None:
    """``dgamma[:] = Σ_rows g⊙x̂`` and ``dbeta[:] = Σ_rows g`` (when given): the column kernel."""
    dt = g.dtype
    if dgamma is None:  # a norm without parameters (affine=False)
        return
    if rows == 0:
        dgamma[...] = 0
        if dbeta is not None:
            dbeta[...] = 0
        return
    chunks, chunk = param_chunks(rows, n)
    part_g, part_b, finish = _column_partials(xp, dgamma, dbeta, chunks, n, dt)
    _kernel("norm_param_grads", dt)(
        (-(-n // _COLUMN_THREADS), chunks), (_COLUMN_THREADS,),
        (g, xhat, part_g, part_b, np.int32(n), np.int64(rows), np.int64(chunk), _flag(dbeta is not None)))
    finish()
