"""jacgrad's own cuBLAS calls: ctypes into the libcublas CuPy loaded, on CuPy's handle for the
current device (``Cublas.gemm``: ``cublasGemmEx``, ``cublasGemmStridedBatchedEx``), and how that
library is found (``cupy_cublas_library``: never a second copy). ``jacgrad.cuda.gemm`` plans the calls
and decides when to make them (inside ``direct_cublas()``, while a CUDA graph records)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

__all__ = ["CUDA_R", "Cublas", "OP_N", "OP_T", "cupy_cublas_library", "open_loaded"]

OP_N, OP_T = 0, 1  # cublasOperation_t
CUDA_R = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # cudaDataType_t: CUDA_R_32F, CUDA_R_64F
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70  # cublasComputeType_t
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_POINTER_MODE_HOST = 0


class Cublas:
    """ctypes calls into the cuBLAS library CuPy loaded, on CuPy's handle for the current device."""

    _instance = None

    @classmethod
    def get(cls) -> "Cublas":
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

    def gemm(self, p, A: int, B: int, C: int, dtype, workspace: tuple[int, int] | None = None, batch=None) -> None:
        """One column-major GEMM (``p``: a ``gemm.GemmPlan``; A, B, C: device pointers) or, with ``batch``
        (a ``gemm.BatchPlan``), a strided batch of them, on the current stream."""
        from ..core.backend import tf32_enabled

        cp, lib = self._cp, self._lib
        handle = ctypes.c_void_p(cp.cuda.device.get_cublas_handle())
        if dtype == np.float32:
            one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
            compute = _COMPUTE_32F_FAST_TF32 if tf32_enabled() else _COMPUTE_32F
        else:
            one, zero = ctypes.c_double(1.0), ctypes.c_double(0.0)
            compute = _COMPUTE_64F
        t = CUDA_R[np.dtype(dtype)]
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
