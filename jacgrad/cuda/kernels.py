"""The elementwise steps of the hot path, written once: NumPy on the CPU, fused CUDA kernels on the GPU.

Every part of jacgrad that scales by φ' goes through this module:

- ``scale_cotangent(v, x, activation)``  → ``v ⊙ φ'(x)`` (the VJP step; x broadcast over rows)
- ``derivative(x, activation)``          → ``φ'(x)`` (when a dense diagonal is needed)
- ``activation_forward(h, activation)``  → ``φ(h)``
- ``forward_with_derivative(h, activation)`` → ``(φ(h), φ'(h))`` in one pass

With ``from_output=True`` the argument is the output ``y = φ(h)`` and the derivative is
``Activation.df_from_output(y)``. On NumPy arrays the activation table's functions compute the
result; on CuPy arrays the templates of ``kernels/fused.cu`` (math in ``kernels/activations.cuh``)
are compiled by NVRTC through CuPy's ``RawModule`` on first use — one module per (source file,
dtype) holding every instantiation of its kernels (``module_expressions``), cached in memory by
``jacgrad.core.cuda_build`` and on disk by CuPy — and launched.

This module never imports CuPy: it reaches it through ``jacgrad.core.backend``.

    >>> import numpy as np
    >>> scale_cotangent(np.ones((2, 3)), np.zeros(3), "sigmoid")
    array([[0.25, 0.25, 0.25],
           [0.25, 0.25, 0.25]])
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from ..elementwise import activations
from ..core import backend
from ..core.cuda_build import (
    CTYPES,
    KERNELS,
    NVRTC_OPTIONS,
    compiled_function,
    compiled_module,
    kernel_expressions,
    launch,
    module_source,
    name_expression,
    read_source,
    source_dir,
    source_expressions,
    special,
)
from ..core.validation import float_array, shape_str
from ..elementwise.activations import Activation
from ..core.backend import get_xp

__all__ = [
    "KERNELS",
    "activation_forward",
    "bias_activation_forward",
    "compile_report",
    "derivative",
    "forward_with_derivative",
    "instantiations",
    "module_expressions",
    "module_source",
    "name_expression",
    "read_source",
    "scale_cotangent",
    "scratch_nbytes",
    "source_dir",
    "special",
]


def _functors() -> list[tuple[str, bool]]:
    """(C++ functor, has df_y) of every row of the activation table, in the table's order."""
    return [(a.cuda, a.df_from_output is not None) for a in map(activations.get, activations.names())]


def instantiations(kernel: str) -> list[str]:
    """Every name expression of ``kernel`` the library may launch: each dtype, activation and,
    for activations with ``df_from_output``, both derivative modes."""
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    return [e for dtype in CTYPES for e in kernel_expressions(kernel, dtype, _functors())]


def module_expressions(source: str, dtype) -> tuple[str, ...]:
    """Every instantiation in the one NVRTC module of ``source`` (``"fused.cu"``) in ``dtype``."""
    return _module_expressions(source, np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _module_expressions(source: str, dtype: np.dtype) -> tuple[str, ...]:
    # Once per (source, dtype): compiled_kernel asks on every launch, and the table's functors are
    # fixed (a parameterised row shares its family's functor), so the list never changes.
    return source_expressions(source, dtype, _functors())


def compiled_kernel(kernel: str, dtype, activation: Activation | None = None, from_output: bool = False):
    """The CuPy kernel for one instantiation, taken from its (source, dtype) module, which is
    compiled on first use (per device) with all its instantiations, and cached."""
    source = KERNELS[kernel][0]
    return compiled_function(kernel, dtype, module_expressions(source, dtype), activation, from_output)


def compile_report() -> list[tuple[str, bool, str]]:
    """(kernel, ok, message) for each kernel template, for ``jacgrad info``.

    With a usable GPU, compiles the (source, dtype) modules the library launches from (the same,
    cached ones); without one, says why not.
    """
    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        return [(kernel, False, f"not compiled: {reason}") for kernel in KERNELS]
    errors = {}
    for source in dict.fromkeys(src for src, _, _ in KERNELS.values()):
        for dtype in CTYPES:
            try:
                compiled_module(source, dtype, module_expressions(source, dtype))
            except Exception as exc:  # noqa: BLE001 - reported, per source
                errors.setdefault(source, " | ".join(str(exc).strip().splitlines()[:3]))
    report = []
    for kernel, (source, _, _) in KERNELS.items():
        if source in errors:
            report.append((kernel, False, f"kernels/{source}: {errors[source]}"))
        else:
            n = len(instantiations(kernel))
            report.append((kernel, True, f"kernels/{source}: {n} instantiations compiled with NVRTC "
                                         f"({' '.join(NVRTC_OPTIONS)}, one module per dtype)"))
    return report


def _resolve(activation: str | Activation) -> Activation:
    if isinstance(activation, (str, Activation)):
        return activations.get(activation)
    raise TypeError(
        f"activation must be a name or an Activation, not {type(activation).__name__}; "
        f"valid names: {', '.join(activations.names())}"
    )


def _params(act: Activation, dtype) -> tuple:
    """The activation's parameters as the kernels' last two arguments ``T pa, T pb``."""
    return tuple(np.dtype(dtype).type(p) for p in act.kernel_args)


def _derivative_of(act: Activation, from_output: bool):
    """The table function for φ' (from h, or from y when ``from_output``)."""
    if not from_output:
        return act.df
    if act.df_from_output is None:
        able = [n for n in activations.names() if activations.get(n).df_from_output is not None]
        raise ValueError(
            f"activation {act.name!r} has no derivative from its output (φ' is not a function of y); "
            f"pass the pre-activation h instead. Activations with one: {', '.join(able)}"
        )
    return act.df_from_output


def _check_out(where: str, out, shape, dtype, xp):
    """``out`` checked against the result's shape and dtype (and contiguity on the GPU)."""
    if out is None:
        return None
    if get_xp(out) is not xp:
        raise TypeError(f"{where}: out is on a different device than the inputs")
    if out.dtype != dtype:
        raise TypeError(f"{where}: out has dtype {out.dtype} but the result is {np.dtype(dtype)}")
    if out.shape != shape:
        raise ValueError(f"{where}: out has shape {shape_str(out.shape)} but the result is {shape_str(shape)}")
    if xp is not np and not out.flags.c_contiguous:
        raise ValueError(f"{where}: out must be C-contiguous for the GPU kernel")
    return out


def _prepare(where: str, x, act: Activation, from_output: bool, out, name: str):
    """(x, xp, out, table function) for the single-input steps."""
    xp = get_xp(x, out)
    x = float_array(x, name, xp)
    fn = _derivative_of(act, from_output)
    return x, xp, _check_out(where, out, x.shape, x.dtype, xp), fn


def scale_cotangent(v: Any, x: Any, activation: str | Activation, from_output: bool = False, out: Any = None):
    """``v ⊙ φ'(x)``: the elementwise step of a VJP (and of a JVP) through a layer's diagonal.

    v: (..., H) cotangent, typically (B, H) or (H,).
    x: the layer's pre-activation h (or its output y when ``from_output``), of v's shape, or
       (H,) shared by every row of v.
    out: optional array of v's shape and dtype to write into (may be v itself).
    Returns an array of v's shape and dtype. v and x must have the same dtype (TypeError) and
    live on the same device (TypeError); mismatched shapes are a ValueError naming both.

        >>> import numpy as np
        >>> scale_cotangent(np.array([[2.0, 2.0]]), np.array([-1.0, 1.0]), "relu")
        array([[0., 2.]])
    """
    act = _resolve(activation)
    where = f"scale_cotangent({act.name})"
    fn = _derivative_of(act, from_output)
    xp = get_xp(v, x, out)
    v = float_array(v, "v", xp)
    x = float_array(x, "x", xp)
    if v.dtype != x.dtype:
        raise TypeError(f"{where}: v is {v.dtype} but x is {x.dtype}; cast one so they agree")
    if x.shape != v.shape and not (v.ndim >= 1 and x.shape == v.shape[-1:]):
        raise ValueError(
            f"{where}: x has shape {shape_str(x.shape)} but v has shape {shape_str(v.shape)}; "
            f"x must have v's shape or be ({v.shape[-1] if v.ndim else 'H'},), shared by every row"
        )
    out = _check_out(where, out, v.shape, v.dtype, xp)
    if xp is np:
        if from_output and act.df_from_output_into is not None:
            d, work = _scratch(x.shape, x.dtype, 2)
            return np.multiply(v, act.df_from_output_into(x, d, work), out=out)
        return np.multiply(v, fn(x), out=out)
    v, x = xp.ascontiguousarray(v), xp.ascontiguousarray(x)
    if out is None:
        out = xp.empty_like(v)
    kernel = compiled_kernel("scale_cotangent", v.dtype, act, from_output)
    launch(kernel, v.size, (v, x, out, np.int64(v.size), np.int64(x.size), *_params(act, v.dtype)), v.itemsize)
    return out


def derivative(x: Any, activation: str | Activation, from_output: bool = False, out: Any = None):
    """``φ'(x)`` elementwise: x is h, or the output y when ``from_output``. Any shape → same shape/dtype.

        >>> import numpy as np
        >>> derivative(np.array([0.0]), "tanh")
        array([1.])
    """
    act = _resolve(activation)
    x, xp, out, fn = _prepare(f"derivative({act.name})", x, act, from_output, out, "x")
    if xp is np:
        return _into(out, fn(x))
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x) if out is None else out
    launch(compiled_kernel("activation_derivative", x.dtype, act, from_output), x.size,
           (x, out, np.int64(x.size), *_params(act, x.dtype)), x.itemsize)
    return out


def activation_forward(h: Any, activation: str | Activation, out: Any = None):
    """``φ(h)`` elementwise. h: any shape, float32/float64 → same shape and dtype.

        >>> import numpy as np
        >>> activation_forward(np.array([-1.0, 2.0]), "relu")
        array([0., 2.])
    """
    act = _resolve(activation)
    h, xp, out, _ = _prepare(f"activation_forward({act.name})", h, act, False, out, "h")
    if xp is np:
        if out is not None and act.f_into is not None:
            return act.f_into(h, out)
        return _into(out, act.f(h))
    h = xp.ascontiguousarray(h)
    out = xp.empty_like(h) if out is None else out
    launch(compiled_kernel("activation_forward", h.dtype, act), h.size,
           (h, out, np.int64(h.size), *_params(act, h.dtype)), h.itemsize)
    return out


def bias_activation_forward(h: Any, b: Any, activation: str | Activation, out: Any = None):
    """``h += b`` (``b: (H,)`` shared by every row of ``h: (…, H)``, in place), then ``φ(h)`` into
    ``out`` (may be ``h``; fresh when None): a dense layer's bias and activation. On the GPU one
    kernel (``kernels/fused.cu``) where eagerly there were two; the same additions and the same
    ``φ``, so the same numbers. On NumPy the two steps as they were.

        >>> import numpy as np
        >>> h = np.array([[-1.0, 2.0]])
        >>> bias_activation_forward(h, np.array([0.5, -3.0]), "relu"), h
        (array([[0., 0.]]), array([[-0.5, -1. ]]))
    """
    act = _resolve(activation)
    where = f"bias_activation_forward({act.name})"
    xp = get_xp(h, b, out)
    if xp is np:
        h += b
        return activation_forward(h, act, out=out)
    if b.shape != h.shape[-1:] or b.dtype != h.dtype or not h.flags.c_contiguous or not b.flags.c_contiguous:
        raise ValueError(f"{where}: h {shape_str(h.shape)} {h.dtype} (C-contiguous) takes a contiguous bias "
                         f"({h.shape[-1] if h.ndim else 0},) of its dtype, got {shape_str(b.shape)} {b.dtype}")
    out = xp.empty_like(h) if out is None else _check_out(where, out, h.shape, h.dtype, xp)
    launch(compiled_kernel("bias_activation_forward", h.dtype, act), h.size,
           (h, b, out, np.int64(h.size), np.int64(max(h.shape[-1], 1)), *_params(act, h.dtype)), h.itemsize)
    return out


def forward_with_derivative(h: Any, activation: str | Activation, out: Any = None):
    """``(φ(h), φ'(h))`` — on the GPU in one pass over h, on NumPy sharing their common part
    (``Activation.f_and_df``). h: any shape → two arrays of h's shape/dtype. ``out``: optional
    pair ``(y, d)`` of arrays of h's shape and dtype to write into (neither may be h).

        >>> import numpy as np
        >>> forward_with_derivative(np.array([0.0]), "sigmoid")
        (array([0.5]), array([0.25]))
    """
    act = _resolve(activation)
    where = f"forward_with_derivative({act.name})"
    h, xp, _, _ = _prepare(where, h, act, False, None, "h")
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"{where}: out must be a pair (y, d) of arrays, got {type(out).__name__}")
        out = tuple(_check_out(where, o, h.shape, h.dtype, xp) for o in out)
    if xp is np:
        y, d = act.f_and_df(h) if act.f_and_df is not None else (act.f(h), act.df(h))
        return (y, d) if out is None else (_into(out[0], y), _into(out[1], d))
    h = xp.ascontiguousarray(h)
    y, d = (xp.empty_like(h), xp.empty_like(h)) if out is None else out
    launch(compiled_kernel("forward_with_derivative", h.dtype, act), h.size,
           (h, y, d, np.int64(h.size), *_params(act, h.dtype)), h.itemsize)
    return y, d


_SCRATCH = threading.local()


def _scratch(shape, dtype, n: int) -> list:
    """``n`` NumPy work arrays of ``shape``/``dtype``, reused from call to call (per thread).

    A fresh array of a few MB costs the OS a page fault per 4 KB the first time it is written —
    about as much as the arithmetic itself — so the backward pass keeps its two work arrays
    instead of allocating them per layer. Only the latest shape is kept: ``scratch_nbytes()``.
    """
    key = (tuple(shape), np.dtype(dtype), n)
    if getattr(_SCRATCH, "key", None) != key:
        _SCRATCH.key, _SCRATCH.arrays = key, [np.empty(shape, dtype) for _ in range(n)]
    return _SCRATCH.arrays


def scratch_nbytes() -> int:
    """Bytes this thread keeps in NumPy work arrays between calls (0 before the first)."""
    return int(sum(a.nbytes for a in getattr(_SCRATCH, "arrays", ())))


def _into(out, result):
    if out is None:
        return result
    out[...] = result
    return out
