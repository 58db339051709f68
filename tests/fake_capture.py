"""What a CUDA-graph capture runs, on the host: the fake CuPy arrays of ``fake_cupy_transfers`` with
jacgrad's direct cuBLAS calls carried out by the BLAS definition (``HostCublas``), and CuPy's own
matmul refused inside ``jacgrad.cuda.gemm.direct_cublas()`` (as CuPy refuses cuBLAS under stream
capture). A test calls ``install_recording(monkeypatch)`` or takes the ``recording`` fixture
(conftest.py, every test file).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

# CuPy's words when a cuBLAS call is made during stream capture
CAPTURE_REFUSAL = "calling cuBLAS API during stream capture is currently unsupported"


class HostCublas:
    """jacgrad's cuBLAS calls (``_gemm._Cublas.gemm``) carried out by the BLAS definition on the host
    memory behind the fake device arrays' pointers: column-major ``C = op(A)·op(B)``, per product
    of a strided batch. ``calls``: "gemm" or "strided batched", one per call."""

    def __init__(self):
        self.calls = []

    def gemm(self, p, A, B, C, dtype, workspace=None, batch=None):
        self.calls.append("strided batched" if batch is not None else "gemm")
        it = np.dtype(dtype).itemsize
        n, (sa, sb, sc) = (batch.count, (batch.stride_a, batch.stride_b, batch.stride_c)) if batch else (1, (0, 0, 0))
        for i in range(n):
            op_a = self._op(A + i * sa * it, p.m, p.k, p.lda, p.transa, dtype)
            op_b = self._op(B + i * sb * it, p.k, p.n, p.ldb, p.transb, dtype)
            self._colmajor(C + i * sc * it, p.m, p.n, p.ldc, dtype)[...] = op_a @ op_b

    @staticmethod
    def _colmajor(ptr, rows, cols, ld, dtype):
        it = np.dtype(dtype).itemsize
        count = ld * (cols - 1) + rows if rows and cols else 0
        buf = np.frombuffer((ctypes.c_char * (count * it)).from_address(ptr), dtype=dtype)
        return np.lib.stride_tricks.as_strided(buf, shape=(rows, cols), strides=(it, ld * it))

    def _op(self, ptr, rows, cols, ld, trans, dtype):
        """``op(X)``, rows × cols: ``X`` itself stored column-major, or (OP_T) its transpose."""
        from jacgrad.cuda.gemm import OP_N

        return self._colmajor(ptr, rows, cols, ld, dtype) if trans == OP_N else self._colmajor(ptr, cols, rows, ld, dtype).T


def install_recording(monkeypatch, refusal: type[Exception] = NotImplementedError, message: str = CAPTURE_REFUSAL):
    """``fake_cupy_transfers`` installed as ``cupy``, jacgrad's cuBLAS calls on a ``HostCublas``
    (the fake's ``host``), and a matmul of fake arrays (``@``, ``cupy.matmul``, ``cupy.einsum``: cuBLAS in
    CuPy) raising ``refusal(message)`` inside ``direct_cublas()`` (NumPy's outside it). Returns the fake."""
    from fake_cupy_transfers import FakeArray, install
    from jacgrad.cuda import gemm as _gemm

    fake = install(monkeypatch)
    host = HostCublas()
    monkeypatch.setattr(_gemm._Cublas, "get", classmethod(lambda cls: host))
    monkeypatch.setattr(FakeArray, "data", property(lambda a: types.SimpleNamespace(ptr=a.__array_interface__["data"][0])),
                        raising=False)

    def refusing(fn):
        def call(*args, **kwargs):
            if _gemm._direct:
                raise refusal(f"cupy.{fn.__name__}: {message}")
            return np.asarray(fn(*(np.asarray(a).view(np.ndarray) if isinstance(a, FakeArray) else a for a in args),
                                 **kwargs)).view(FakeArray)
        return call

    matmul = refusing(np.matmul)
    monkeypatch.setattr(FakeArray, "__matmul__", lambda a, b: matmul(a, b))
    monkeypatch.setattr(FakeArray, "__rmatmul__", lambda a, b: matmul(b, a))
    fake.module.matmul, fake.module.einsum = matmul, refusing(np.einsum)
    fake.host = host
    return fake


@pytest.fixture
def recording(monkeypatch):
    """``install_recording``'s fake, refusing CuPy's matmul under capture as CuPy does
    (``NotImplementedError``)."""
    return install_recording(monkeypatch)
