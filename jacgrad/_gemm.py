"""Matrix products into a given output, and the one place jacgrad calls cuBLAS itself.

``matmul_into(a, b, out)`` is ``out[...] = a @ b``: ``np.matmul`` / ``cupy.matmul`` — except
inside ``direct_cublas()``, the block in which a ``TrainingStep`` records its CUDA graph. CuPy
refuses cuBLAS calls on a capturing stream (cupy/cupy#6290: its wrapper of ``cublasSetStream``
raises there) while cuBLAS itself supports stream capture; so inside that block a 2-D product
goes through ``cublasSetStream_v2`` and ``cublasGemmEx`` called with ctypes, on the handle CuPy
made for the device and from the library CuPy loaded (found in ``/proc/self/maps``). Any failure
there surfaces as an exception inside the capture, which ``TrainingStep`` turns into running
without a graph (``capture="auto"``) or a ``CaptureError`` (``capture=True``).

Row-major operands map onto column-major cuBLAS without copies: ``C = A·B`` row-major is
``Cᵀ = Bᵀ·Aᵀ`` column-major, and a row-major operand (or a transposed view, or a row slice) is
read through its leading dimension. ``gemm_plan`` is that arithmetic on shapes and strides alone,
tested on the CPU against a column-major GEMM emulated in NumPy (``tests/test_gemm.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass

import numpy as np

from .backend import get_xp

__all__ = ["GemmPlan", "direct_cublas", "gemm_plan", "matmul_into"]

OP_N, OP_T = 0, 1  # cublasOperation_t
_CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # cudaDataType_t: CUDA_R_32F, CUDA_R_64F
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70  # cublasComputeType_t
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_POINTER_MODE_HOST = 0

_direct = [0]  # depth of direct_cublas() blocks


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


@contextlib.contextmanager
def direct_cublas():
    """Inside: CuPy products of ``matmul_into`` call cuBLAS directly (legal under stream capture)."""
    _direct[0] += 1
    try:
        yield
    finally:
        _direct[0] -= 1


def matmul_into(a, b, out):
    """``a @ b`` written into ``out`` (same device and dtype, shape ``a.shape[:-1] + b.shape[-1:]``)."""
    xp = get_xp(a, b, out)
    if xp is np or not _direct[0] or a.ndim != 2 or b.ndim != 2 or out.ndim != 2:
        return xp.matmul(a, b, out=out)
    dt = np.dtype(out.dtype)
    plan = None
    if a.dtype == dt and b.dtype == dt and dt in _CUDA_R:
        plan = gemm_plan(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, dt.itemsize)
    if plan is None:
        return xp.matmul(a, b, out=out)
    _Cublas.get().gemm(plan, b.data.ptr, a.data.ptr, out.data.ptr, dt)
    return out


class _Cublas:
    """ctypes calls into the cuBLAS library CuPy loaded, on CuPy's handle for the current device."""

    _instance = None

    @classmethod
    def get(cls) -> "_Cublas":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        from .backend import cupy

        self._cp = cupy()
        self._cp.cuda.device.get_cublas_handle()  # makes CuPy load libcublas and create the handle
        path = _loaded_library("libcublas.so")
        lib = ctypes.CDLL(path)
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasGetPointerMode_v2.argtypes = [vp, ctypes.POINTER(i)]
        lib.cublasSetPointerMode_v2.argtypes = [vp, i]
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        for f in (lib.cublasSetStream_v2, lib.cublasGetPointerMode_v2, lib.cublasSetPointerMode_v2, lib.cublasGemmEx):
            f.restype = i
        self._lib, self.path = lib, path

    def gemm(self, p: GemmPlan, A: int, B: int, C: int, dtype) -> None:
        from .backend import tf32_enabled

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
        _check(lib.cublasSetPointerMode_v2(handle, _POINTER_MODE_HOST), "cublasSetPointerMode_v2")
        try:
            status = lib.cublasGemmEx(handle, p.transa, p.transb, p.m, p.n, p.k, ctypes.byref(one),
                                      ctypes.c_void_p(A), t, p.lda, ctypes.c_void_p(B), t, p.ldb,
                                      ctypes.byref(zero), ctypes.c_void_p(C), t, p.ldc, compute, _GEMM_DEFAULT)
        finally:
            lib.cublasSetPointerMode_v2(handle, mode.value)
        _check(status, "cublasGemmEx")


_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH", 11: "MAPPING_ERROR",
           13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} returned CUBLAS_STATUS_{_STATUS.get(status, status)}")


def _loaded_library(stem: str) -> str:
    """Path of the already loaded shared library whose file name starts with ``stem``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.rsplit("/", 1)[-1].startswith(stem):
                    return path
    except OSError as exc:
        raise RuntimeError(f"cannot read /proc/self/maps to find {stem} ({exc})") from None
    raise RuntimeError(f"{stem} is not loaded in this process (CuPy has not initialised cuBLAS)")
