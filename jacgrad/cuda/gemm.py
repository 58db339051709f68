"""Matrix products into a given output, and the one place jacgrad calls cuBLAS itself.

``matmul_into(a, b, out)`` is ``out[...] = a @ b`` and ``matmul(a, b)`` is ``a @ b``: ``np.matmul`` /
``cupy.matmul`` — except inside ``direct_cublas()``, the block in which a compiled step (training or
Jacobian) records its CUDA graph. CuPy
refuses cuBLAS calls on a capturing stream (cupy/cupy#6290: its wrapper of ``cublasSetStream``
raises there) while cuBLAS itself supports stream capture; so inside that block a 2-D product
goes through ``cublasSetStream_v2``, ``cublasSetWorkspace_v2`` and ``cublasGemmEx`` (a stack of
products, ``matmul`` only: ``cublasGemmStridedBatchedEx``) called with
ctypes, on the handle CuPy made for the device and from the very library CuPy loaded (``cuda.pathfinder``
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
import ctypes
import os
from dataclasses import dataclass

import numpy as np

from . import hostpool
from ..core.backend import get_xp

__all__ = ["BatchPlan", "GemmPlan", "direct_cublas", "gemm_batched_plan", "gemm_plan", "matmul", "matmul_into",
           "workspace_bytes"]

OP_N, OP_T = 0, 1  # cublasOperation_t
_CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # cudaDataType_t: CUDA_R_32F, CUDA_R_64F
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70  # cublasComputeType_t
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_POINTER_MODE_HOST = 0

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
    product goes through jacgrad's own cuBLAS call, which stream capture allows: ``cublasGemmEx``
    for 2-D operands, ``cublasGemmStridedBatchedEx`` for stacks ``(n, M, K) @ (n, K, N)`` (either
    side may be one 2-D matrix shared by the stack). Anywhere else it is ``a @ b`` itself."""
    xp = get_xp(a, b)
    if xp is np:
        return _host_matmul(a, b)
    if not _direct or a.ndim not in (2, 3) or b.ndim not in (2, 3):
        return a @ b
    dt = np.result_type(a.dtype, b.dtype)
    if a.dtype != dt or b.dtype != dt or dt not in _CUDA_R:
        return a @ b
    if a.ndim == 2 and b.ndim == 2:
        return matmul_into(a, b, xp.empty((a.shape[0], b.shape[1]), dtype=dt))
    count = a.shape[0] if a.ndim == 3 else b.shape[0]
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        return a @ b  # a broadcast batch (1 against n): CuPy's own
    out = xp.empty((count, a.shape[-2], b.shape[-1]), dtype=dt)
    if out.size == 0 or a.shape[-1] == 0:
        return a @ b
    plans = gemm_batched_plan(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, dt.itemsize)
    if plans is None:
        return a @ b
    _Cublas.get().gemm(plans[0], b.data.ptr, a.data.ptr, out.data.ptr, dt, workspace=_direct[-1], batch=plans[1])
    return out


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
    """``a @ b`` written into ``out`` (same device and dtype, shape ``a.shape[:-1] + b.shape[-1:]``)."""
    xp = get_xp(a, b, out)
    if xp is np or not _direct or a.ndim != 2 or b.ndim != 2 or out.ndim != 2:
        return xp.matmul(a, b, out=out)
    dt = np.dtype(out.dtype)
    plan = None
    if a.dtype == dt and b.dtype == dt and dt in _CUDA_R:
        plan = gemm_plan(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, dt.itemsize)
    if plan is None:
        return xp.matmul(a, b, out=out)
    _Cublas.get().gemm(plan, b.data.ptr, a.data.ptr, out.data.ptr, dt, workspace=_direct[-1])
    return out


class _Cublas:
    """ctypes calls into the cuBLAS library CuPy loaded, on CuPy's handle for the current device."""

    _instance = None

    @classmethod
    def get(cls) -> "_Cublas":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self, cp=None, lib=None):
        if cp is None:
            from ..core.backend import cupy

            cp = cupy()
        self._cp = cp
        cp.cuda.device.get_cublas_handle()  # makes CuPy load libcublas and create the handle
        if lib is None:
            lib = cupy_cublas_library(cp)
        vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        signatures = {
            "cublasSetStream_v2": [vp, vp],
            "cublasSetWorkspace_v2": [vp, vp, ctypes.c_size_t],
            "cublasGetPointerMode_v2": [vp, ctypes.POINTER(i)],
            "cublasSetPointerMode_v2": [vp, i],
            "cublasGemmEx": [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i],
            "cublasGemmStridedBatchedEx": [vp, i, i, i, i, i, vp, vp, i, i, ll, vp, i, i, ll, vp, vp, i, i, ll,
                                           i, i, i],
        }
        for name, argtypes in signatures.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = argtypes, i
        self._lib, self.path = lib, getattr(lib, "_name", None)

    def gemm(self, p: GemmPlan, A: int, B: int, C: int, dtype, workspace: tuple[int, int] | None = None,
             batch: BatchPlan | None = None) -> None:
        from ..core.backend import tf32_enabled

        cp, lib = self._cp, self._lib
        handle = ctypes.c_void_p(cp.cuda.device.get_cublas_handle())
        if dtype == np.float32:
            one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
            compute = _COMPUTE_32F_FAST_TF32 if tf32_enabled() else _COMPUTE_32F
        else:
            one, zero = ctypes.c_double(1.0), ctypes.c_double(0.0)
            compute = _COMPUTE_64F
        t = _CUDA_R[np.dtype(dtype)]
        mode = ctypes.c_int(0)
        _check(lib.cublasGetPointerMode_v2(handle, ctypes.byref(mode)), "cublasGetPointerMode_v2")
        _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "cublasSetStream_v2")
        if workspace is not None:  # cublasSetStream_v2 just reset it to cuBLAS's own
            _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(workspace[0]), ctypes.c_size_t(workspace[1])),
                   "cublasSetWorkspace_v2")
        _check(lib.cublasSetPointerMode_v2(handle, _POINTER_MODE_HOST), "cublasSetPointerMode_v2")
        ll = ctypes.c_longlong
        try:
            if batch is None:
                call = "cublasGemmEx"
                status = lib.cublasGemmEx(handle, p.transa, p.transb, p.m, p.n, p.k, ctypes.byref(one),
                                          ctypes.c_void_p(A), t, p.lda, ctypes.c_void_p(B), t, p.ldb,
                                          ctypes.byref(zero), ctypes.c_void_p(C), t, p.ldc, compute, _GEMM_DEFAULT)
            else:
                call = "cublasGemmStridedBatchedEx"
                status = lib.cublasGemmStridedBatchedEx(
                    handle, p.transa, p.transb, p.m, p.n, p.k, ctypes.byref(one),
                    ctypes.c_void_p(A), t, p.lda, ll(batch.stride_a), ctypes.c_void_p(B), t, p.ldb, ll(batch.stride_b),
                    ctypes.byref(zero), ctypes.c_void_p(C), t, p.ldc, ll(batch.stride_c), batch.count,
                    compute, _GEMM_DEFAULT)
        finally:
            lib.cublasSetPointerMode_v2(handle, mode.value)
        _check(status, call)


_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 11: "MAPPING_ERROR",
           13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} returned CUBLAS_STATUS_{_STATUS.get(status, status)}")


def open_loaded(name: str) -> ctypes.CDLL:
    """The shared library ``name`` (a soname or a path) ALREADY loaded in this process, never a new
    copy (``RTLD_NOLOAD``); RuntimeError naming it when it is not loaded."""
    try:
        return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as exc:
        raise RuntimeError(f"{name} is not loaded in this process ({exc}); CuPy has not initialised cuBLAS") from None


def cupy_cublas_library(cp) -> ctypes.CDLL:
    """The libcublas CuPy itself loaded: ``cuda.pathfinder``'s (CuPy >= 14 loads its CUDA libraries
    through it, and it returns its cached copy), else ``libcublas.so.<runtime major>`` by soname.
    Never the first libcublas in ``/proc/self/maps``: torch may have loaded another one."""
    major = int(str(cp.__version__).split(".")[0])
    if major >= 14:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib
        except ImportError:
            pass
        else:
            return open_loaded(load_nvidia_dynamic_lib("cublas").abs_path)
    runtime_major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
    return open_loaded(f"libcublas.so.{runtime_major}")
