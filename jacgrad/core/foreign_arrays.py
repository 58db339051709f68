"""Arrays of other frameworks (torch, JAX, any DLPack or CUDA-array-interface object): what they
are and where they live, read from their type and DLPack without importing their framework, and
how they become NumPy or CuPy views. ``backend.asarray`` is the public door; this is its room.

    >>> import numpy as np
    >>> is_foreign_array(np.ones(2)), is_gpu_array(np.ones(2))
    (False, False)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["from_foreign", "is_foreign_array", "is_gpu_array", "on_gpu"]


def is_gpu_array(x: Any) -> bool:
    """True for a CuPy array (checked without importing CuPy)."""
    module = type(x).__module__
    return module == "cupy" or module.startswith("cupy.")


# DLPack device types (dlpack.h): the CUDA memory CuPy can read, and the host memory NumPy can
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def is_foreign_array(x: Any) -> bool:
    """True for an array of another framework (torch, JAX, any DLPack or CUDA-array-interface
    object) that ``asarray`` turns into a NumPy or CuPy array; False for NumPy, CuPy, lists, scalars."""
    if isinstance(x, (np.ndarray, np.generic)) or is_gpu_array(x):
        return False
    t = type(x)
    return hasattr(t, "__dlpack__") or hasattr(t, "__cuda_array_interface__") or t.__module__.startswith("torch")


def foreign_on_gpu(x: Any) -> bool:
    """Whether a foreign array lives in CUDA device memory (read from DLPack, never by importing its framework)."""
    if hasattr(type(x), "__dlpack_device__"):
        return int(x.__dlpack_device__()[0]) in (_DL_CUDA, _DL_CUDA_MANAGED)
    return hasattr(type(x), "__cuda_array_interface__")


def from_foreign(a: Any, cupy_module: Callable[[], Any]):
    """A foreign array ``a`` as NumPy or CuPy, sharing its memory (the rules: ``backend.asarray``).
    ``a`` is one for which ``is_foreign_array`` holds; ``cupy_module()`` gives CuPy, or raises
    saying why it is not usable, for CUDA memory."""
    if type(a).__module__.startswith("torch"):
        return _from_torch(a, cupy_module)
    if foreign_on_gpu(a):
        cp = cupy_module()
        return cp.from_dlpack(a) if hasattr(type(a), "__dlpack__") else cp.asarray(a)
    if hasattr(type(a), "__dlpack_device__"):
        kind = int(a.__dlpack_device__()[0])
        if kind not in (_DL_CPU, _DL_CUDA_HOST):
            raise TypeError(
                f"{type(a).__name__} lives on DLPack device type {kind}, which is neither host memory nor CUDA; "
                "move it to the CPU or a CUDA device first"
            )
    try:
        return np.from_dlpack(a)
    except (TypeError, BufferError, RuntimeError) as exc:
        raise TypeError(f"cannot read a {type(a).__module__}.{type(a).__name__} through DLPack: {exc}") from None


def _from_torch(t: Any, cupy_module: Callable[[], Any]):
    """A torch tensor as NumPy (CPU) or CuPy (CUDA), sharing its memory; see ``asarray``."""
    if str(t.dtype) == "torch.bfloat16":
        raise TypeError("a bfloat16 tensor has no NumPy or CuPy dtype; cast it first (tensor.float() or .double())")
    t = t.detach()
    if t.is_conj() or t.is_neg():  # lazy conjugate/negative views have no plain memory to share
        t = t.resolve_conj().resolve_neg()
    kind = t.device.type
    if kind == "cpu":
        return t.numpy()
    if kind == "cuda":
        return cupy_module().from_dlpack(t)
    raise TypeError(f"a torch tensor on device {t.device} is neither CPU nor CUDA memory; move it with .cpu() first")


def on_gpu(x: Any) -> bool:
    """Whether ``x`` is a CuPy array or a CUDA array of another framework."""
    return is_gpu_array(x) or (is_foreign_array(x) and foreign_on_gpu(x))
