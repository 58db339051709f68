"""Matrix products into a given output, and the one place jacgrad calls cuBLAS itself.

``matmul_into(a, b, out)`` is ``out[...] = a @ b`` and ``matmul(a, b)`` is ``a @ b``: ``np.matmul`` /
``cupy.matmul`` — except inside ``direct_cublas()``, the block in which a compiled step (training or
Jacobian) records its CUDA graph. CuPy
refuses cuBLAS calls on a capturing stream (cupy/cupy#6290: its wrapper of ``cublasSetStream``
raises there) while cuBLAS itself supports stream capture; so inside that block a product
of any ranks goes through ``cublasSetStream_v2``, ``cublasSetWorkspace_v2`` and ``cublasGemmEx``
(a stack of products: ``cublasGemmStridedBatchedEx``, looped over batch axes that do not collapse
into one stride; ``_direct_matmul``) called with ctypes, on the handle CuPy made for the device and from the very library CuPy loaded (``cuda.pathfinder``
on CuPy >= 14, else the soname of the runtime's major version opened with ``RTLD_NOLOAD``: never a
second copy, which would crash on CuPy's handle). Any failure there surfaces as an exception inside
the capture, which ``TrainingStep`` turns into running without a graph (``capture="auto"``) or a
``CaptureError`` (``capture=True``).

Workspace: ``cublasSetStream_v2`` resets the handle's workspace to cuBLAS's default, which under
stream capture cuBLAS would allocate itself, outside CuPy's pool. So every ``cublasSetStream_v2``
here is followed by ``cublasSetWorkspace_v2`` with the block ``direct_cublas(workspace)`` was given
(``GraphCache`` takes it from the graph's private pool before capturing: ``workspace_bytes()``,
32 MiB on sm_90 as NVIDIA recommends, 4 MiB before). CuPy's own cuBLAS calls begin with their own
``cublasSetStream``, which drops that binding again, so the block is never used after the graph's
pool is gone.

Row-major operands map onto column-major cuBLAS without copies: ``C = A·B`` row-major is
``Cᵀ = Bᵀ·Aᵀ`` column-major, and a row-major operand (or a transposed view, or a row slice) is
read through its leading dimension. ``gemm_plan`` is that arithmetic on shapes and strides alone,
tested on the CPU against a column-major GEMM emulated in NumPy (``tests/test_gemm.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from . import hostpool
from .cublas import CUDA_R as _CUDA_R, OP_N, OP_T, Cublas as _Cublas, cupy_cublas_library, open_loaded
from ..core.backend import get_xp

__all__ = ["BatchPlan", "GemmPlan", "OP_N", "OP_T", "cupy_cublas_library", "direct_cublas", "gemm_batched_plan", "gemm_plan",
           "matmul", "matmul_into", "open_loaded", "workspace_bytes"]


_direct: list = []  # one (pointer, bytes) workspace, or None, per open direct_cublas() block


@dataclass(frozen=True)
class GemmPlan:
    """Arguments of one column-major ``gemm`` computing a row-major ``out = a @ b``:
    ``C(m×n) = op_A(A) · op_B(B)`` with ``A`` = b's memory, ``B`` = a's memory, ``C`` = out's."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int


def _layout(shape, strides, itemsize: int):
    """``(op, ld)`` such that ``op`` applied to the memory read column-major with leading
    dimension ``ld`` gives the TRANSPOSE of the row-major matrix; None when no such view exists."""
    rows, cols = shape
    rs, cs = strides
    if rs < 0 or cs < 0 or rs % itemsize or cs % itemsize:
        return None
    rs, cs = rs // itemsize, cs // itemsize
    if (cols <= 1 or cs == 1) and (rows <= 1 or rs >= max(cols, 1)):
        return OP_N, (rs if rows > 1 else max(cols, 1))  # row-major: the memory is xᵀ, column-major
    if (rows <= 1 or rs == 1) and (cols <= 1 or cs >= max(rows, 1)):
        return OP_T, (cs if cols > 1 else max(rows, 1))  # column-major: the memory is x itself
    return None


def gemm_plan(a_shape, a_strides, b_shape, b_strides, out_shape, out_strides, itemsize: int) -> GemmPlan | None:
    """The column-major call for ``out = a @ b`` (2-D; strides in bytes), or None when an operand
    has a layout cuBLAS cannot read in place (then the caller uses the library's matmul)."""
    (M, K), (K2, N) = a_shape, b_shape
    if K != K2 or tuple(out_shape) != (M, N):
        raise ValueError(f"gemm: shapes {tuple(a_shape)} @ {tuple(b_shape)} -> {tuple(out_shape)} do not match")
    la, lb, lc = (_layout(s, st, itemsize) for s, st in ((a_shape, a_strides), (b_shape, b_strides), (out_shape, out_strides)))
    if la is None or lb is None or lc is None or lc[0] != OP_N:
        return None
    return GemmPlan(transa=lb[0], transb=la[0], m=N, n=M, k=K, lda=lb[1], ldb=la[1], ldc=lc[1])


@dataclass(frozen=True)
class BatchPlan:
    """The batch of a strided-batched ``gemm``: ``count`` products, the i-th reading cuBLAS's A,
    B and C at ``i ·`` their element strides (0: one matrix shared by every product)."""

    count: int
    stride_a: int
    stride_b: int
    stride_c: int


def gemm_batched_plan(a_shape, a_strides, b_shape, b_strides, out_shape, out_strides, itemsize: int):
    """``(GemmPlan, BatchPlan)`` for ``out[i] = a[i] @ b[i]`` with ``out: (n, M, N)`` and each of
    ``a: (n, M, K)`` / ``b: (n, K, N)`` stacked or a 2-D matrix shared by all (batch stride 0);
    strides in bytes. None when a layout cannot be read in place (the caller uses ``a @ b``)."""
    if len(out_shape) != 3 or len(a_shape) not in (2, 3) or len(b_shape) not in (2, 3):
        raise ValueError(f"gemm: a batched product needs a 3-D output and 2-D or 3-D operands, "
                         f"got {tuple(a_shape)} @ {tuple(b_shape)} -> {tuple(out_shape)}")
    count = out_shape[0]
    split = []
    for shape, strides in ((a_shape, a_strides), (b_shape, b_strides), (out_shape, out_strides)):
        if len(shape) == 3:
            if shape[0] != count:
                raise ValueError(f"gemm: batches of {tuple(a_shape)} @ {tuple(b_shape)} -> {tuple(out_shape)} do not match")
            split.append((shape[1:], strides[1:], strides[0]))
        else:
            split.append((shape, strides, 0))
    (a2, sa, ba), (b2, sb, bb), (o2, so, bo) = split
    plan = gemm_plan(a2, sa, b2, sb, o2, so, itemsize)
    if plan is None or any(st < 0 or st % itemsize for st in (ba, bb, bo)):
        return None
    if count > 1 and bo < o2[0] * o2[1] * itemsize:
        return None  # outputs that overlap: never written in place
    return plan, BatchPlan(count=int(count), stride_a=bb // itemsize, stride_b=ba // itemsize, stride_c=bo // itemsize)


@contextlib.contextmanager
def direct_cublas(workspace: tuple[int, int] | None = None):
    """Inside: CuPy products of ``matmul_into`` call cuBLAS directly (legal under stream capture).

    workspace: ``(device pointer, bytes)`` handed to cuBLAS after each ``cublasSetStream_v2``
    (needed under capture, see the module docstring); None leaves cuBLAS its default one."""
    if workspace is not None:
        ptr, nbytes = (int(w) for w in workspace)
        if ptr == 0 or nbytes <= 0:
            raise ValueError(f"direct_cublas: workspace must be a device pointer and a byte count > 0, got {workspace!r}")
        workspace = (ptr, nbytes)
    _direct.append(workspace)
    try:
        yield
    finally:
        _direct.pop()


def workspace_bytes(compute_capability_major: int) -> int:
    """The cuBLAS workspace NVIDIA recommends per handle: 32 MiB on Hopper (sm_90) and later, 4 MiB before."""
    return (32 if compute_capability_major >= 9 else 4) << 20


def matmul(a, b):
    """``a @ b``, a new array. Inside ``direct_cublas()`` (a CUDA graph being recorded) a CuPy
    product goes through jacgrad's own cuBLAS calls, which stream capture allows (``_direct_matmul``:
    any ranks with NumPy's broadcasting). Anywhere else it is ``a @ b`` itself."""
    xp = get_xp(a, b)
    if xp is np:
        return _host_matmul(a, b)
    if not _direct:
        return a @ b
    return _direct_matmul(xp, a, b, None)


def _host_matmul(a, b):
    """NumPy's ``a @ b`` into a block of ``hostpool``: the stacks of a Jacobian product are
    tens of MB each, and fresh ones are page-faulted in on every call (5,000 faults a call for
    the blocks benchmark's Jacobians; 8% of its time)."""
    dt = np.result_type(a.dtype, b.dtype)
    if a.ndim < 2 or b.ndim < 2 or dt.kind != "f":
        return a @ b
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return np.matmul(a, b, out=hostpool.empty(shape, dt))


def matmul_into(a, b, out):
    """``a @ b`` written into ``out`` (same device and dtype, shape ``a @ b``'s): ``np.matmul`` /
    ``cupy.matmul`` with ``out=``, or inside ``direct_cublas()`` jacgrad's own cuBLAS calls."""
    xp = get_xp(a, b, out)
    if xp is np or not _direct:
        return xp.matmul(a, b, out=out)
    return _direct_matmul(xp, a, b, out)


def _direct_matmul(xp, a, b, out):
    """``a @ b`` (into ``out`` when given) through ``cublasGemmEx`` / ``cublasGemmStridedBatchedEx``:
    NumPy's matmul rules (1-D operands, broadcast batch axes), any strides. The batch axes that
    collapse into one stride for all three arrays make one strided-batched call; the others are
    looped over in Python (more nodes of the graph being recorded, not more host work per replay).
    An operand whose matrix cuBLAS cannot read in place is copied contiguous first (an elementwise
    kernel, recordable), an output it cannot write is computed into a new array and copied in; an
    operand of another dtype is cast to the result's. A dtype cuBLAS has no GEMM for goes to
    ``a @ b`` (which CuPy refuses under capture, naming the product)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least one axis, got shapes {a.shape} and {b.shape}")
    dt = np.dtype(out.dtype) if out is not None else np.result_type(a.dtype, b.dtype)
    if dt not in _CUDA_R:
        return a @ b if out is None else xp.matmul(a, b, out=out)
    va, vb = a.ndim == 1, b.ndim == 1
    a2, b2 = (a[None] if va else a), (b[:, None] if vb else b)
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} @ {b.shape} do not match (contracted axes "
                         f"{a2.shape[-1]} and {b2.shape[-2]})")
    batch = tuple(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]))
    M, K, N = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    shape = batch + ((() if va else (M,)) + (() if vb else (N,)))
    if out is None:
        out = xp.empty(shape, dtype=dt)
    elif tuple(out.shape) != shape:
        raise ValueError(f"matmul: out has shape {out.shape}, {a.shape} @ {b.shape} needs {shape}")
    o2 = out[..., None, None] if va and vb else out[..., None, :] if va else out[..., None] if vb else out
    if out.size == 0:
        return out
    if K == 0:
        out.fill(0)
        return out
    a2, b2 = (_readable(xp, x.astype(dt, copy=False), dt.itemsize) for x in (a2, b2))
    target = o2 if _writable(o2, dt.itemsize) else xp.empty(batch + (M, N), dtype=dt)
    rows = _as_rows(a2, b2, target, batch, dt.itemsize)
    if rows is not None:  # a stack times one matrix whose rows fold into one: one GEMM
        _gemm_loop(*rows, dt)
    else:
        _gemm_loop(xp.broadcast_to(a2, batch + (M, K)), xp.broadcast_to(b2, batch + (K, N)), target, dt)
    if target is not o2:
        o2[...] = target
    return out


def _readable(xp, x, itemsize: int):
    """``x``, or its contiguous copy when cuBLAS cannot read its matrices or step its batch in place."""
    ok = _layout(x.shape[-2:], x.strides[-2:], itemsize) is not None and all(
        st >= 0 and st % itemsize == 0 for st in x.strides[:-2])
    return x if ok else xp.ascontiguousarray(x)


def _as_rows(a, b, out, batch: tuple, itemsize: int):
    """``(a, b, out)`` as one 2-D product ``(rows, K) @ (K, N) -> (rows, N)`` when ``b`` is one matrix
    and the batch and row axes of ``a`` and ``out`` fold into one axis of rows that cuBLAS reads in
    place (``reshape(-1, n)`` a view); else None."""
    if b.ndim != 2 or a.ndim <= 2 or tuple(a.shape[:-2]) != batch or not (_folds(a) and _folds(out)):
        return None
    a2, o2 = a.reshape(-1, a.shape[-1]), out.reshape(-1, out.shape[-1])
    if gemm_plan(a2.shape, a2.strides, b.shape, b.strides, o2.shape, o2.strides, itemsize) is None:
        return None
    return a2, b, o2


def _folds(x) -> bool:
    """Whether every axis of ``x`` but the last folds into one (unit axes ignored, any stride)."""
    dims = [(n, st) for n, st in zip(x.shape[:-1], x.strides[:-1]) if n != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _writable(out, itemsize: int) -> bool:
    """Whether cuBLAS can write every matrix of ``out`` in place (row-major, distinct batch entries)."""
    lc = _layout(out.shape[-2:], out.strides[-2:], itemsize)
    return lc is not None and lc[0] == OP_N and all(
        st >= 0 and st % itemsize == 0 for st in out.strides[:-2]) and not _overlaps(out)


def _overlaps(out) -> bool:
    """Whether two batch entries of ``out`` share memory (a zero or too-small batch stride)."""
    span = out.shape[-2] * out.shape[-1] * out.itemsize
    return any(n > 1 and st < span for n, st in zip(out.shape[:-2], out.strides[:-2]))


def _collapsed(batch: tuple, arrays) -> int:
    """How many trailing batch axes collapse into one stride in every one of ``arrays``."""
    k = min(len(batch), 1)
    while k < len(batch):
        i = len(batch) - k - 1
        if not all(x.strides[i] == x.strides[i + 1] * batch[i + 1] for x in arrays):
            break
        k += 1
    return k


def _gemm_loop(A, Bm, C, dt) -> None:
    """``C[idx] = A[idx] @ Bm[idx]`` for the common batch of the three (same batch shape, sizes > 0)."""
    import itertools

    keep = [i for i, n in enumerate(C.shape[:-2]) if n != 1]  # unit axes dropped: any stride is fine
    idx0 = tuple(0 if i not in keep else slice(None) for i in range(C.ndim - 2))
    A, Bm, C = A[idx0], Bm[idx0], C[idx0]
    batch = C.shape[:-2]
    k = _collapsed(batch, (A, Bm, C))
    outer = batch[:len(batch) - k]
    count = int(np.prod(batch[len(batch) - k:], dtype=np.int64)) if k else 1
    it = dt.itemsize
    lib = _Cublas.get()
    for idx in itertools.product(*(range(n) for n in outer)):
        a, b, c = A[idx], Bm[idx], C[idx]
        plan = gemm_plan(a.shape[-2:], a.strides[-2:], b.shape[-2:], b.strides[-2:], c.shape[-2:], c.strides[-2:], it)
        if plan is None:  # _readable/_writable made every layout readable
            raise RuntimeError(f"gemm: no cuBLAS layout for {a.shape} @ {b.shape} (strides {a.strides}, {b.strides})")
        batch_plan = None
        if count > 1:
            sa, sb, sc = (x.strides[-3] // it for x in (a, b, c))
            batch_plan = BatchPlan(count=count, stride_a=sb, stride_b=sa, stride_c=sc)
        lib.gemm(plan, b.data.ptr, a.data.ptr, c.data.ptr, dt, workspace=_direct[-1], batch=batch_plan)
