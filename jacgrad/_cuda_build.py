"""Where the CUDA sources are, how their templates are named, and how CuPy compiles them.

The sources live in the repository's ``kernels/`` and ship in the wheel as ``jacgrad/_kernels``.
Each kernel template is instantiated through a C++ name expression such as
``jacgrad::scale_cotangent<float, jacgrad::Tanh, false>``; ``instantiations()`` lists every one
the library can launch, so the tests compile exactly those with nvcc, and ``compile_report()``
compiles them with NVRTC on a machine with a GPU.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from . import activations, backend
from .activations import Activation

# kernel template -> (source file, whether it takes an activation, whether it has FROM_OUTPUT)
KERNELS: dict[str, tuple[str, bool, bool]] = {
    "scale_cotangent": ("fused.cu", True, True),
    "activation_forward": ("fused.cu", True, False),
    "activation_derivative": ("fused.cu", True, True),
    "forward_with_derivative": ("fused.cu", True, False),
    "erf_elementwise": ("special.cu", False, False),
    "erfc_elementwise": ("special.cu", False, False),
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
    package = Path(__file__).resolve().parent
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


def name_expression(kernel: str, dtype, activation: Activation | None = None, from_output: bool = False) -> str:
    """The C++ name of one instantiation, e.g. ``jacgrad::scale_cotangent<float, jacgrad::Tanh, false>``."""
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    _, takes_activation, takes_from_output = KERNELS[kernel]
    dtype = np.dtype(dtype)
    if dtype not in CTYPES:
        raise TypeError(f"kernel {kernel} runs on float32 or float64, not {dtype}")
    args = [CTYPES[dtype]]
    if takes_activation:
        args.append(activation.cuda)
    if takes_from_output:
        args.append("true" if from_output else "false")
    return f"jacgrad::{kernel}<{', '.join(args)}>"


def instantiations(kernel: str) -> list[str]:
    """Every name expression of ``kernel`` the library may launch: each dtype, activation and,
    for activations with ``df_from_output``, both derivative modes."""
    _, takes_activation, takes_from_output = KERNELS[kernel]
    acts = [activations.get(n) for n in activations.names()] if takes_activation else [None]
    out = []
    for dtype in CTYPES:
        for act in acts:
            modes = (False, True) if takes_from_output and act.df_from_output is not None else (False,)
            out.extend(name_expression(kernel, dtype, act, fo) for fo in modes)
    return out


@functools.lru_cache(maxsize=None)
def _compiled(kernel: str, dtype: np.dtype, activation: str | None, from_output: bool, device: int):
    cp = backend.cupy()
    act = activations.get(activation) if activation is not None else None
    expr = name_expression(kernel, dtype, act, from_output)
    source = KERNELS[kernel][0]
    try:
        module = cp.RawModule(code=module_source(source), options=NVRTC_OPTIONS, name_expressions=(expr,))
        return module.get_function(expr)
    except Exception as exc:  # CuPy's CompileException carries NVRTC's log
        raise RuntimeError(f"compiling {expr} from kernels/{source} failed: {exc}") from exc


def compiled_kernel(kernel: str, dtype, activation: Activation | None = None, from_output: bool = False):
    """The CuPy kernel for one instantiation, compiled on first use (per device) and cached."""
    cp = backend.cupy()
    name = activation.name if activation is not None else None
    return _compiled(kernel, np.dtype(dtype), name, bool(from_output), cp.cuda.Device().id)


def launch(kernel_fn, n: int, args: tuple) -> None:
    """Run a grid-stride kernel over ``n`` elements (nothing to do when n == 0)."""
    if n == 0:
        return
    grid = min(-(-n // _BLOCK), _MAX_BLOCKS)
    kernel_fn((grid,), (_BLOCK,), args)


def compile_report() -> list[tuple[str, bool, str]]:
    """(kernel, ok, message) for each kernel template, for ``jacgrad info``.

    With a usable GPU, compiles every instantiation of each kernel with NVRTC; without one, says why not.
    """
    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        return [(kernel, False, f"not compiled: {reason}") for kernel in KERNELS]
    cp = backend.cupy()
    report = []
    for kernel, (source, _, _) in KERNELS.items():
        exprs = instantiations(kernel)
        try:
            module = cp.RawModule(code=module_source(source), options=NVRTC_OPTIONS, name_expressions=exprs)
            for expr in exprs:
                module.get_function(expr)
        except Exception as exc:
            first = str(exc).strip().splitlines()[:3]
            report.append((kernel, False, f"kernels/{source}: " + " | ".join(first)))
        else:
            report.append((kernel, True, f"kernels/{source}: {len(exprs)} instantiations compiled with NVRTC"))
    return report
