"""Array backends: NumPy always, CuPy when a CUDA device really runs a kernel.

This is the only module that imports CuPy. Everything else asks it for the array
namespace of its inputs (``get_xp``) and never moves arrays between host and device
on its own: mixing a NumPy and a CuPy array in one call is a ``TypeError``.

``JACGRAD_BACKEND=numpy|cupy`` forces the default device of ``device="auto"``:
``numpy`` never touches the GPU, ``cupy`` raises ``RuntimeError`` where no GPU runs.

    >>> import numpy as np, jacgrad as jg
    >>> jg.get_xp(np.ones(3)) is np
    True
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any

import numpy as np

from .foreign_arrays import from_foreign, is_foreign_array, is_gpu_array, on_gpu

__all__ = [
    "asarray",
    "available",
    "cupy",
    "default_device",
    "device_of",
    "get_xp",
    "gpu_available",
    "gpu_unavailable_reason",
    "is_foreign_array",
    "is_gpu_array",
    "resolve_device",
    "tf32",
    "tf32_enabled",
    "to_device",
    "to_numpy",
]

_ENV = "JACGRAD_BACKEND"
_BACKEND_NAMES = ("numpy", "cupy")
_DEVICE_NAMES = ("cpu", "gpu", "auto")


@functools.lru_cache(maxsize=1)
def _probe_gpu() -> tuple[bool, str]:
    """(usable, reason): import CuPy and run one tiny kernel end to end.

    CuPy installs and imports on machines with no driver and fails only at the first
    call, so importing is not enough: the probe allocates, launches and synchronises.
    """
    try:
        import cupy  # noqa: F401  (the one import of CuPy in jacgrad)
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy imports but sees no CUDA device"
        a = cupy.arange(4, dtype=cupy.float32)
        total = float((a * 2).sum())  # compiles and launches a kernel, then syncs
        cupy.cuda.Stream.null.synchronize()
        if total != 12.0:
            return False, f"a test kernel on the GPU returned {total}, expected 12.0"
    except Exception as exc:
        return False, f"CuPy imports but no kernel runs ({type(exc).__name__}: {exc})"
    return True, "a CUDA device runs kernels"


def gpu_available() -> bool:
    """True only when CuPy imports *and* a CUDA device runs a test kernel."""
    return _probe_gpu()[0]


def gpu_unavailable_reason() -> str | None:
    """Why the GPU is not usable, or None when it is."""
    ok, reason = _probe_gpu()
    return None if ok else reason


def available() -> tuple[str, ...]:
    """The backends that work here: ``("numpy",)`` or ``("numpy", "cupy")``."""
    return ("numpy", "cupy") if gpu_available() else ("numpy",)


def _forced_backend() -> str | None:
    value = os.environ.get(_ENV, "").strip().lower()
    if not value:
        return None
    if value not in _BACKEND_NAMES:
        raise ValueError(f"{_ENV}={value!r} is not a backend; valid names: {', '.join(_BACKEND_NAMES)}")
    return value


def default_device() -> str:
    """The device that ``device="auto"`` means: ``"gpu"`` or ``"cpu"``.

    ``JACGRAD_BACKEND`` forces it; without it, the GPU when one runs kernels.
    Asking for ``cupy`` where no GPU runs is a ``RuntimeError``, never a fallback.
    """
    forced = _forced_backend()
    if forced == "numpy":
        return "cpu"
    if forced == "cupy":
        _require_gpu(f"{_ENV}=cupy")
        return "gpu"
    return "gpu" if gpu_available() else "cpu"


def resolve_device(device: str) -> str:
    """Map ``"cpu" | "gpu" | "auto"`` to ``"cpu"`` or ``"gpu"``, checking the GPU is usable."""
    if not isinstance(device, str) or device.lower() not in _DEVICE_NAMES:
        raise ValueError(f"device {device!r} is not one of {', '.join(_DEVICE_NAMES)}")
    device = device.lower()
    if device == "auto":
        return default_device()
    if device == "gpu":
        _require_gpu('device="gpu"')
    return device


def _require_gpu(what: str) -> None:
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{what} asks for the GPU, but none is usable here: {reason}")


def cupy():
    """The CuPy module, for the code that builds and launches kernels (``jacgrad.cuda.kernels``).

    Raises ``RuntimeError`` with the probe's reason when no GPU runs kernels here.
    """
    _require_gpu("building a CUDA kernel")
    return _cupy_module()


def _cupy_module():
    # Reached for arrays whose type lives in cupy (so cupy is imported), and for CUDA arrays of
    # other frameworks, where CuPy may be missing: then say so.
    module = sys.modules.get("cupy")
    if module is not None:
        return module
    if not gpu_available():  # the probe imports CuPy where it can
        raise RuntimeError(
            f"a CUDA array was given, but jacgrad runs CUDA arrays through CuPy and none is usable here "
            f"({gpu_unavailable_reason()}); install CuPy, or move the array to the CPU (torch: .cpu())"
        )
    return sys.modules["cupy"]


def asarray(a: Any):
    """``a`` as a NumPy or CuPy array, sharing its memory wherever that is possible.

    - NumPy and CuPy arrays are returned as they are; lists and scalars go through ``np.asarray``.
    - torch tensors: detached first when they require grad (the result shares the memory, never
      the autograd graph). On the CPU, ``Tensor.numpy()`` — a view; on CUDA, ``cupy.from_dlpack``
      — a view of the same device memory. bfloat16 has no NumPy dtype: a ``TypeError`` says to cast.
    - JAX and any other object with ``__dlpack__``: host memory through ``np.from_dlpack`` (a
      view, read-only where the producer says so), CUDA memory through ``cupy.from_dlpack``.
    - objects with only ``__cuda_array_interface__`` (Numba, ...): ``cupy.asarray``, a view.

    CUDA streams: ``cupy.from_dlpack`` hands the producer CuPy's current stream (the DLPack
    ``stream`` argument; 1 means the legacy default stream — CuPy PR #5970, dmlc/dlpack#57), and
    the producer makes that stream wait for its pending work on the array. So the result is safe
    to use on CuPy's current stream; work queued later on another framework's stream is not
    ordered with it. A CUDA array where CuPy is not usable is a ``RuntimeError`` saying why —
    jacgrad never copies it to the host for you.

        >>> import numpy as np
        >>> x = np.ones(3)
        >>> asarray(x) is x
        True
    """
    if isinstance(a, np.ndarray) or is_gpu_array(a):
        return a
    if not is_foreign_array(a):
        return np.asarray(a)
    return from_foreign(a, _cupy_module)


def device_of(x: Any) -> str:
    """``"gpu"`` for a CuPy array (or a CUDA array of another framework), ``"cpu"`` otherwise."""
    return "gpu" if on_gpu(x) else "cpu"


def get_xp(*arrays: Any):
    """The array namespace (``numpy`` or ``cupy``) of ``arrays``; None and scalars are ignored.

    Raises ``TypeError`` naming the arguments when NumPy and CuPy arrays are mixed.

        >>> import numpy as np
        >>> get_xp(np.zeros(2), None, 3.0) is np
        True
    """
    nd = np.ndarray
    for a in arrays:  # the common case (NumPy arrays and None), checked cheaply: no generator
        if type(a) is not nd and a is not None:
            break
    else:
        return np
    cp = sys.modules.get("cupy")  # the common GPU case (CuPy arrays and None), as cheaply
    cnd = getattr(cp, "ndarray", None)
    if cnd is not None and cnd is not nd:
        for a in arrays:
            if type(a) is not cnd and a is not None:
                break
        else:
            return cp
    gpu, cpu = [], []
    for i, a in enumerate(arrays):
        if a is None or isinstance(a, (int, float, complex, bool, np.generic)):
            continue
        (gpu if on_gpu(a) else cpu).append(i)
    if gpu and cpu:
        raise TypeError(
            f"arrays on different devices: argument(s) {cpu} are NumPy (CPU) and {gpu} are CuPy (GPU); "
            "jacgrad never copies between them silently — move them with jacgrad.to_device(x, 'cpu'|'gpu')"
        )
    return _cupy_module() if gpu else np


def dot_along(a, b, axis: int):
    """``Σ_axis a ⊙ b`` of two arrays of one shape (that axis dropped): NumPy's ``einsum``, one
    pass and no temporary; on CuPy a product and a sum — ``cupy.einsum`` plans on the host for
    longer than these products take on the GPU (H100 profile in benchmarks/results/h100-2026-11-26-peers).

        >>> import numpy as np
        >>> dot_along(np.ones((2, 3)), np.full((2, 3), 2.0), 1)
        array([6., 6.])
    """
    xp = get_xp(a, b)
    if a.shape != b.shape:
        raise ValueError(f"dot_along: shapes {a.shape} and {b.shape} differ")
    axis = axis % a.ndim
    if xp is np:
        s = "abcdefghijk"[: a.ndim]
        return np.einsum(f"{s},{s}->{s[:axis] + s[axis + 1:]}", a, b)
    return (a * b).sum(axis=axis)


def to_device(x: Any, device: str):
    """Copy ``x`` to ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy); a no-op when it is already there."""
    if not isinstance(device, str) or device.lower() not in ("cpu", "gpu"):
        raise ValueError(f"device {device!r} is not one of cpu, gpu")
    if device.lower() == "cpu":
        return to_numpy(x)
    if is_gpu_array(x):
        return x
    _require_gpu("to_device(x, 'gpu')")
    return _cupy_module().asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array of ``x`` (copied off the GPU when it is a CuPy array)."""
    if is_gpu_array(x):
        return x.get()
    return np.asarray(x)


# ---------------------------------------------------------------------- TF32
# TF32 GEMMs on CuPy: cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32 for float32 products. CuPy picks the
# compute type of every float32 GEMM (cublasGemmEx) from a process-wide table set by
# cupy._core._routines_linalg.set_compute_type; its CUPY_TF32=1 variable only seeds that table.
# The math mode of the cuBLAS handle (cublasSetMathMode) is not what CuPy's matmul consults.
def _cupy_tf32_env() -> bool:
    try:
        return int(os.environ.get("CUPY_TF32", "0") or 0) > 0
    except ValueError:  # CuPy itself reads it with int(); an unreadable value is not ours to judge
        return False


_TF32 = [_cupy_tf32_env()]
_TF32_NOOP_WARNED = [False]


def tf32_enabled() -> bool:
    """Whether float32 GEMMs on CuPy run in TF32 (see ``tf32``). False by default."""
    return _TF32[0]


def _apply_tf32(enabled: bool) -> None:
    if gpu_available():
        from cupy._core import _routines_linalg as linalg  # CuPy's GEMM compute-type table

        kind = getattr(linalg, "COMPUTE_TYPE_TF32", 7) if enabled else getattr(linalg, "COMPUTE_TYPE_DEFAULT", 1)
        linalg.set_compute_type(np.float32, kind)
    elif enabled and not _TF32_NOOP_WARNED[0]:
        _TF32_NOOP_WARNED[0] = True
        warnings.warn(
            "jacgrad.core.backend.tf32(True) only changes float32 matrix products on CuPy; no GPU is usable "
            f"here ({gpu_unavailable_reason()}), so NumPy results are unchanged",
            UserWarning,
            stacklevel=3,
        )
    _TF32[0] = enabled


class tf32:
    """Switch TF32 tensor-core math for float32 matrix products on CuPy: a setter and a context manager.

        jg.backend.tf32(True)              # from now on
        with jg.backend.tf32(True):        # inside the block only; the previous setting comes back
            loss, g = step(x, t)

    Off by default (unless CuPy's own ``CUPY_TF32=1`` is set). It changes cuBLAS GEMMs of float32
    arrays only — float64, the elementwise kernels and NumPy are untouched. Where no GPU is usable
    it is a no-op that warns once (``UserWarning``). Needs compute capability ≥ 8.0; on older GPUs
    CuPy warns and keeps full float32.

    Accuracy: TF32 rounds each GEMM input to 10 explicit mantissa bits (unit roundoff
    ``u = 2⁻¹¹ ≈ 4.9e-4``) and accumulates in float32. For products of unstructured data the
    normwise relative error of one GEMM is expected near ``u`` (2e-4 to 1e-3; not yet measured on
    a GPU — the GPU suite is to report it), against about 1e-6 in full float32; the rigorous worst
    case grows like ``K·u`` for inner dimension K. Through a depth-L chain the errors add roughly
    like ``√L · u``: expect weight gradients of an 8-layer net within about 1e-3 to 5e-3
    (relative, Frobenius) of float64.
    A CUDA graph captured by ``MLP.compile`` bakes the compute type in; the step re-captures
    when the setting has changed since its capture.
    """

    def __init__(self, enabled: bool = True):
        self._previous = _TF32[0]
        _apply_tf32(bool(enabled))

    def __enter__(self) -> "tf32":
        return self

    def __exit__(self, *exc) -> None:
        _apply_tf32(self._previous)

    def __repr__(self) -> str:
        return f"tf32(enabled={_TF32[0]})"
