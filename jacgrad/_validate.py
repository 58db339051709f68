"""Checks at the public edge: float dtypes and shapes, with messages that name what is wrong."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .backend import get_xp, is_gpu_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(x: Any, name: str, xp=None):
    """``x`` as a float32/float64 array of namespace ``xp`` (no copy when it already is one).

    Python lists and scalars are converted with NumPy's default float64; integer, bool and
    complex arrays are a ``TypeError`` — jacgrad does not guess a float width for them.
    """
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


def replacement(j: int, new, old, what: str):
    """``new`` if it may replace layer ``j``'s array ``old`` (same shape, dtype and device);
    else a ``TypeError``/``ValueError`` naming the layer and what differs. Not copied."""
    if not (isinstance(new, np.ndarray) or is_gpu_array(new)):
        kind = type(new).__module__.split(".")[0] + "." + type(new).__name__ if hasattr(new, "shape") else type(new).__name__
        raise TypeError(f"layer {j}: {what} must be a NumPy or CuPy array, not {kind}")
    if is_gpu_array(new) != is_gpu_array(old):
        raise TypeError(
            f"layer {j}: {what} is a {'CuPy (GPU)' if is_gpu_array(new) else 'NumPy (CPU)'} array but this "
            f"network is on the {'GPU' if is_gpu_array(old) else 'CPU'}; move it with jacgrad.to_device"
        )
    new = float_array(new, f"layer {j}: {what}", get_xp(old))
    if new.shape != old.shape:
        raise ValueError(
            f"layer {j}: {what} has shape {shape_str(new.shape)} but this network's layer {j} needs "
            f"{shape_str(old.shape)}; build a new MLP to change the widths"
        )
    if new.dtype != old.dtype:
        raise TypeError(f"layer {j}: {what} has dtype {new.dtype} but this network is {old.dtype}; cast it first")
    if is_gpu_array(old) and new.device.id != old.device.id:
        raise ValueError(f"layer {j}: {what} is on GPU {new.device.id} but this network is on GPU {old.device.id}")
    return new


def layer_widths(sizes) -> list[int]:
    """``sizes`` as a list of ints ≥ 1: integers, or integer-valued floats; anything else names the entry."""
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a list of layer widths [n_in, …, n_out], got {sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"sizes must be at least two positive widths [n_in, …, n_out], got {sizes}")
    out = []
    for i, s in enumerate(sizes):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
            raise TypeError(f"sizes[{i}] = {s!r}: layer widths must be integers")
        if not isinstance(s, numbers.Integral):
            if not math.isfinite(s) or s != int(s):
                raise ValueError(f"sizes[{i}] = {s!r}: layer widths must be integers (not truncated silently)")
        s = int(s)
        if s < 1:
            where = "the input width" if i == 0 else f"layer {i - 1}'s output width"
            raise ValueError(
                f"sizes[{i}] = {s}: {where} must be at least 1 (zero-width layers are not supported); got sizes {sizes}"
            )
        out.append(s)
    return out


def nonnegative_finite(value, name: str) -> float:
    """``value`` as a float that is finite and ≥ 0; else an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and ≥ 0, got {value}")
    return value
