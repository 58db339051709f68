"""Every NVRTC module jacgrad builds, compiled by NVRTC itself — no GPU needed.

CuPy's ``RawModule`` hands NVRTC the inlined source (``kernels.module_source``), the options
``_cuda_build.NVRTC_OPTIONS`` and the name expressions of one (source, dtype) module. nvcc (the
sm_90 builds of tests/test_kernels_host.py) is not NVRTC: NVRTC has no system headers and its own
builtins, so here the very text and expressions CuPy would pass are compiled to PTX for
compute_90 through NVRTC's C API, and every expression must lower to a kernel entry of the PTX.

NVRTC is found through ``JACGRAD_NVRTC`` (a path to libnvrtc), the ``nvidia-cuda-nvrtc`` wheel
(``pip install nvidia-cuda-nvrtc``; it ships libnvrtc, no GPU needed), or the loader's path;
without it the test skips and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from jacgrad.core import cuda_build as _cuda_build
from jacgrad.cuda import kernels

SOURCES = sorted({src for src, _, _ in kernels.KERNELS.values()})


def _find_nvrtc() -> str | None:
    if os.environ.get("JACGRAD_NVRTC"):
        return os.environ["JACGRAD_NVRTC"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root).glob("cu*/lib/libnvrtc.so*")) + sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))
        if found:
            return str(found[0])
    return ctypes.util.find_library("nvrtc")


@pytest.fixture(scope="module")
def nvrtc():
    path = _find_nvrtc()
    if path is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc, or set JACGRAD_NVRTC to libnvrtc)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _compile(lib, source: str, dtype) -> tuple[str, dict[str, str], str]:
    """(PTX, {expression: lowered name}, log) of one module, as CuPy would build it."""
    def ok(rc, what):
        assert rc == 0, f"{what}: {lib.nvrtcGetErrorString(rc).decode()}"

    exprs = kernels.module_expressions(source, dtype)
    prog = ctypes.c_void_p()
    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), kernels.module_source(source).encode(), source.encode(), 0, None,
                              None), "nvrtcCreateProgram")
    try:
        for e in exprs:
            ok(lib.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression({e})")
        opts = [o.encode() for o in (*_cuda_build.NVRTC_OPTIONS, "-arch=compute_90")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        log = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetProgramLog(prog, log), "log")
        assert rc == 0, f"NVRTC could not compile kernels/{source} for {np.dtype(dtype)}:\n{log.value.decode()}"
        lowered = {}
        for e in exprs:
            name = ctypes.c_char_p()
            ok(lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(name)), f"nvrtcGetLoweredName({e})")
            lowered[e] = name.value.decode()
        ok(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetPTX(prog, ptx), "PTX")
        return ptx.value.decode(), lowered, log.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_each_module_as_cupy_would(nvrtc, source, dtype):
    ptx, lowered, log = _compile(nvrtc, source, dtype)
    assert lowered and len(lowered) == len(kernels.module_expressions(source, dtype))
    missing = [e for e, name in lowered.items() if f".entry {name}(" not in ptx]
    assert not missing, f"kernels/{source}: no kernel entry in the PTX for {missing[:3]}"
    assert "warning" not in log.lower(), log
