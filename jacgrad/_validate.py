"""Checks at the public edge: float dtypes and shapes, with messages that name what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import asarray, get_xp, is_foreign_array, is_gpu_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(x: Any, name: str, xp=None):
    """``x`` as a float32/float64 array of namespace ``xp`` (no copy when it already is one).

    Python lists and scalars are converted with NumPy's default float64; integer, bool and
    complex arrays are a ``TypeError`` — jacgrad does not guess a float width for them. torch,
    JAX and other DLPack arrays become NumPy or CuPy views first (``backend.asarray``).
    """
    if is_foreign_array(x):
        x = asarray(x)
    if xp is None:
        xp = get_xp(x)
    if not hasattr(x, "dtype"):
        x = xp.asarray(x, dtype=np.float64)
    if is_gpu_array(x) != (xp is not np):
        where = "CuPy (GPU)" if is_gpu_array(x) else "NumPy (CPU)"
        raise TypeError(f"{name} is a {where} array but the other inputs are not; move it with jacgrad.to_device")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; jacgrad works in float32 or float64 — cast it first")
    return x


def common_dtype(*arrays) -> np.dtype:
    """float64 if any array is float64, else float32 (arrays already checked by float_array)."""
    return np.result_type(*[a.dtype for a in arrays if a is not None])


def shape_str(shape) -> str:
    """``(3,)``, ``(4, 5)``: the shape as Python prints a tuple of ints."""
    return str(tuple(int(s) for s in shape))
