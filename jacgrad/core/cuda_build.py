"""Where the CUDA sources are, how their templates are named, and how CuPy compiles them.

The sources live in the repository's ``kernels/`` and ship in the wheel as ``jacgrad/_kernels``.
Each kernel template is instantiated through a C++ name expression such as
``jacgrad::scale_cotangent<float, jacgrad::Tanh, false>``.

Compilation: ONE NVRTC module per (source file, dtype, device), holding every instantiation of
every kernel of that file in that dtype (``source_expressions``): 8 compiles on a cold start
(fused.cu, special.cu, norm.cu and softmax.cu, float and double) where one module per instantiation took
about 130.
``compiled_module`` is that cache; ``compiled_function`` picks one kernel out of it.

This module sits below the activation table: it knows functors only by their C++ names (the
``cuda`` column of ``jacgrad.elementwise.activations``, passed in by ``jacgrad.cuda.kernels``), so ``_erf`` can
launch CUDA's erf/erfc through ``special`` without importing the table that imports it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import backend
from .validation import float_array
from .backend import get_xp

# kernel template -> (source file, whether it takes an activation, whether it has FROM_OUTPUT)
KERNELS: dict[str, tuple[str, bool, bool]] = {
    "scale_cotangent": ("fused.cu", True, True),
    "activation_forward": ("fused.cu", True, False),
    "bias_activation_forward": ("fused.cu", True, False),
    "activation_derivative": ("fused.cu", True, True),
    "forward_with_derivative": ("fused.cu", True, False),
    "erf_elementwise": ("special.cu", False, False),
    "erfc_elementwise": ("special.cu", False, False),
    "norm_forward": ("norm.cu", False, False),
    "norm_product": ("norm.cu", False, False),
    "norm_backward": ("norm.cu", False, False),
    "norm_param_grads": ("norm.cu", False, False),
    "softmax_rows": ("softmax.cu", False, False),
    "softmax_jvp": ("softmax.cu", False, False),
}

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
NVRTC_OPTIONS = ("--std=c++17",)
_BLOCK = 256
# Enough blocks to fill any current GPU several times over; the grid-stride loops cover the rest.
_MAX_BLOCKS = 8192
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def source_dir() -> Path:
    """The folder of the CUDA sources: the installed ``jacgrad/_kernels``, else the repo's ``kernels/``."""
    package = Path(__file__).resolve().parents[__name__.count(".") - 1]  # jacgrad/, wherever this module sits
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if (candidate / "activations.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"jacgrad's CUDA sources are in neither {package / '_kernels'} (installed wheel) "
        f"nor {package.parent / 'kernels'} (source checkout)"
    )


def read_source(name: str) -> str:
    """The text of one source file, e.g. ``read_source("fused.cu")``."""
    folder = source_dir()
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.suffix in (".cu", ".cuh"))
        raise FileNotFoundError(f"no CUDA source {name!r} in {folder}; present: {', '.join(present)}")
    return path.read_text(encoding="utf-8")


def module_source(name: str) -> str:
    """``name`` with its local ``#include "..."`` headers inlined (each once).

    NVRTC then needs no include path, and CuPy's on-disk cache, keyed by the source text, sees
    a change to a header as a change to the module.
    """
    seen: set[str] = set()

    def expand(file: str) -> str:
        seen.add(file)
        text = _PRAGMA_ONCE.sub("", read_source(file))
        return _INCLUDE.sub(lambda m: "" if m.group(1) in seen else expand(m.group(1)), text)

    return expand(name)


def name_expression(kernel: str, dtype, activation: Any = None, from_output: bool = False) -> str:
    """The C++ name of one instantiation, e.g. ``jacgrad::scale_cotangent<float, jacgrad::Tanh, false>``.
    activation: an ``Activation`` (its ``cuda`` functor) or the functor's C++ name."""
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    _, takes_activation, takes_from_output = KERNELS[kernel]
    dtype = np.dtype(dtype)
    if dtype not in CTYPES:
        raise TypeError(f"kernel {kernel} runs on float32 or float64, not {dtype}")
    args = [CTYPES[dtype]]
    if takes_activation:
        args.append(activation if isinstance(activation, str) else activation.cuda)
    if takes_from_output:
        args.append("true" if from_output else "false")
    return f"jacgrad::{kernel}<{', '.join(args)}>"


def kernel_expressions(kernel: str, dtype, functors: Iterable[tuple[str, bool]]) -> list[str]:
    """Every name expression of ``kernel`` in ``dtype``: per functor ``(C++ name, has df_y)``, and
    for functors with ``df_y`` both derivative modes. Kernels without an activation ignore ``functors``."""
    _, takes_activation, takes_from_output = KERNELS[kernel]
    out = []
    for functor, has_df_y in (functors if takes_activation else [(None, False)]):
        modes = (False, True) if takes_from_output and has_df_y else (False,)
        out.extend(name_expression(kernel, dtype, functor, fo) for fo in modes)
    return out


def source_expressions(source: str, dtype, functors: Iterable[tuple[str, bool]]) -> tuple[str, ...]:
    """Every name expression of every kernel of ``source`` in ``dtype``: the one module's contents."""
    functors = list(functors)
    return tuple(e for k, (src, _, _) in KERNELS.items() if src == source for e in kernel_expressions(k, dtype, functors))


@functools.lru_cache(maxsize=None)
def _module(source: str, dtype: np.dtype, expressions: tuple[str, ...], device: int):
    cp = backend.cupy()
    try:
        return cp.RawModule(code=module_source(source), options=NVRTC_OPTIONS, name_expressions=expressions)
    except Exception as exc:  # CuPy's CompileException carries NVRTC's log
        raise RuntimeError(
            f"compiling kernels/{source} for {CTYPES[dtype]} ({len(expressions)} instantiations) failed: {exc}"
        ) from exc


def compiled_module(source: str, dtype, expressions: tuple[str, ...]):
    """The NVRTC module of ``source`` in ``dtype`` with all ``expressions`` (``source_expressions``),
    compiled on first use per device and cached (in memory here, on disk by CuPy)."""
    cp = backend.cupy()
    return _module(source, np.dtype(dtype), tuple(expressions), cp.cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _function(source: str, dtype: np.dtype, expressions: tuple[str, ...], expr: str, device: int):
    return _module(source, dtype, expressions, device).get_function(expr)


@functools.lru_cache(maxsize=None)
def _name_expression(kernel: str, dtype: np.dtype, functor: str | None, from_output: bool) -> str:
    return name_expression(kernel, dtype, functor, from_output)


def compiled_function(kernel: str, dtype, expressions: tuple[str, ...], activation: Any = None,
                      from_output: bool = False):
    """One kernel of the module ``compiled_module(KERNELS[kernel][0], dtype, expressions)``."""
    functor = activation if activation is None or isinstance(activation, str) else activation.cuda
    expr = _name_expression(kernel, np.dtype(dtype), functor, bool(from_output))  # per launch: cached
    if expr not in expressions:
        raise KeyError(f"{expr} is not among the instantiations compiled for kernels/{KERNELS[kernel][0]}")
    cp = backend.cupy()
    return _function(KERNELS[kernel][0], np.dtype(dtype), tuple(expressions), expr, cp.cuda.Device().id)


def launch(kernel_fn, n: int, args: tuple, itemsize: int = 16) -> None:
    """Run a grid-stride kernel over ``n`` elements of ``itemsize`` bytes (nothing to do when n == 0).
    The kernels move 16 bytes per thread and step (kernels/elementwise.cuh), so the grid is sized
    for ``n / (16 / itemsize)`` threads (capped; the loops cover the rest)."""
    if n == 0:
        return
    per_thread = max(1, 16 // int(itemsize))
    grid = min(-(-n // (_BLOCK * per_thread)), _MAX_BLOCKS)
    kernel_fn((grid,), (_BLOCK,), args)


def special(name: str, x: Any):
    """CUDA's ``erf`` or ``erfc`` of a CuPy array (``jacgrad.elementwise.activations.erf/erfc`` call this for
    CuPy input; NumPy input goes to jacgrad's own implementation). x: any shape → same shape/dtype."""
    if name not in ("erf", "erfc"):
        raise ValueError(f"special function {name!r} is not one of erf, erfc")
    xp = get_xp(x)
    if xp is np:
        raise TypeError(f"kernels.special({name!r}) runs on CuPy arrays; use jacgrad.elementwise.activations.{name} for NumPy")
    x = xp.ascontiguousarray(float_array(x, "x", xp))
    out = xp.empty_like(x)
    fn = compiled_function(f"{name}_elementwise", x.dtype, source_expressions("special.cu", x.dtype, ()))
    launch(fn, x.size, (x, out, np.int64(x.size)), x.itemsize)
    return out
