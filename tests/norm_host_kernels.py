"""kernels/norm.cuh and kernels/softmax.cuh built for the host: the kernels of kernels/norm.cu and
kernels/softmax.cu, run on host threads.

``build(compiler, folder)`` compiles a small C++ library (g++, or nvcc as host code) whose
``jg_<kernel>_<float|double>`` entry points take the kernel's own arguments plus the launch's
grid and block, and run every block of the grid, each with ``block`` host threads that meet at
a barrier in ``HostBlock::sum`` where the device's threads meet in ``DeviceBlock::sum`` — the
same row functions as the device, in the same thread partition.

``HostModule(lib)`` stands in for a CuPy ``RawModule`` of norm.cu: ``get_function(name
expression)`` gives a callable ``fn(grid, block, args)`` that takes the arguments exactly as
``jacgrad.cuda.norm_kernels`` hands them to CuPy (arrays, and NumPy scalars of the kernel's
parameter types, checked) and runs the host build. The tests use it to check the numbers
(tests/test_kernels_norm_host.py, tests/test_kernels_softmax_host.py) and the wiring
(tests/test_norm_wiring_fake.py).

The fixtures ``host_libraries`` (every compiler's build, once a module) and ``host_device`` (the
kernels on each build in turn) serve the numbers' tests: a test module imports both by name.
"""

from __future__ import annotations

import ctypes
import types
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jacgrad.cuda import kernels

LIBRARY = r"""
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include "norm.cuh"
#include "softmax.cuh"

using namespace jacgrad;

// The threads of one block, and the barrier they meet at.
struct Shared {
  std::mutex m;
  std::condition_variable cv;
  int size, arrived = 0;
  long long generation = 0;
  alignas(16) unsigned char slots[4 * 1024 * sizeof(double)];
  explicit Shared(int s) : size(s) {}
  void barrier() {
    std::unique_lock<std::mutex> lock(m);
    const long long g = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != g; });
    }
  }
};

struct HostBlock {
  int tid, size;
  Shared* shared;
  // Every thread's v[k] becomes op over the block's threads' v[k] (in thread order).
  template <int K, class T, class Op> void reduce(T (&v)[K], Op op) const {
    T* slot = reinterpret_cast<T*>(shared->slots);
    for (int k = 0; k < K; ++k) slot[k * size + tid] = v[k];
    shared->barrier();
    for (int k = 0; k < K; ++k) {
      T t = slot[k * size];
      for (int q = 1; q < size; ++q) t = op(t, slot[k * size + q]);
      v[k] = t;
    }
    shared->barrier();
  }
  template <int K, class T> void sum(T (&v)[K]) const { reduce(v, norm::Plus{}); }
};

// Every row group of every block of the grid, one after the other; the threads of a group at once,
// each with its rows as the device's thread gets them (norm::row_group).
template <class F> static void run_grid(long long grid, int threads, int group, F f) {
  for (long long block = 0; block < grid; ++block)
    for (int first = 0; first < threads; first += group) {
      Shared shared(group);
      std::vector<std::thread> team;
      for (int t = first; t < first + group; ++t)
        team.emplace_back([&, t] {
          const norm::RowGroup g = norm::row_group(t, threads, block, grid, group);
          f(HostBlock{g.tid, group, &shared}, g.first, g.stride);
        });
      for (auto& th : team) th.join();
    }
}

#define JG_ENTRIES(T)                                                                                          \
  extern "C" void jg_norm_forward_##T(long long grid, int threads, const T* x, const T* gamma, const T* beta,  \
                                      T* y, T* xhat, T* inv, int n, long long rows, T eps, int centered,         \
                                      int has_beta, int group) {                                               \
    run_grid(grid, threads, group, [&](const HostBlock& b, long long blk, long long g) {                             \
      norm::forward_block(b, blk, g, x, gamma, beta, y, xhat, inv, n, rows, eps, centered != 0, has_beta != 0); \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" void jg_norm_product_##T(long long grid, int threads, const T* a, const T* xhat, const T* gamma,   \
                                      const T* inv, T* out, int n, long long rows, long long a_rows,           \
                                      long long per_sample, int centered, int transpose, int group) {          \
    run_grid(grid, threads, group, [&](const HostBlock& b, long long blk, long long g) {                             \
      norm::project_block(b, blk, g, a, xhat, gamma, inv, out, (T*)nullptr, (T*)nullptr, (T*)nullptr, n, rows, \
                          a_rows, per_sample, centered != 0, transpose != 0, true, false, false, false);       \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" void jg_norm_backward_##T(long long grid, int threads, const T* gr, const T* xhat, const T* gamma, \
                                       const T* inv, T* dx, T* sq, T* part_g, T* part_b, int n, long long rows, \
                                       int centered, int write_dx, int with_sq, int with_beta, int fuse,       \
                                       int group) {                                                            \
    run_grid(grid, threads, group, [&](const HostBlock& b, long long blk, long long g) {                             \
      norm::project_block(b, blk, g, gr, xhat, gamma, inv, dx, sq, part_g, part_b, n, rows, rows, 1LL,         \
                          centered != 0, true, write_dx != 0, with_sq != 0, with_beta != 0, fuse != 0);        \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" void jg_norm_param_grads_##T(long long gx, long long gy, int threads, const T* gr, const T* xhat,  \
                                          T* part_g, T* part_b, int n, long long rows, long long chunk,         \
                                          int with_beta) {                                                     \
    for (long long by = 0; by < gy; ++by)                                                                      \
      for (long long bx = 0; bx < gx; ++bx)                                                                    \
        for (int t = 0; t < threads; ++t)                                                                      \
          norm::param_grads_column(bx * threads + t, by, gr, xhat, part_g, part_b, n, rows, chunk,             \
                                   with_beta != 0);                                                            \
  }                                                                                                            \
  extern "C" void jg_softmax_rows_##T(long long grid, int threads, const T* s, T* p, int n, long long rows,       \
                                      T scale, long long queries, long long per_sample, int causal,            \
                                      const bool* pad, int has_pad, int group) {                               \
    const softmax::RowMask mk{queries, per_sample, causal != 0, has_pad ? pad : nullptr};                    \
    run_grid(grid, threads, group, [&](const HostBlock& b, long long blk, long long g) {                        \
      softmax::forward_block(b, blk, g, s, p, n, rows, scale, mk);                                            \
    });                                                                                                        \
  }                                                                                                            \
  extern "C" void jg_softmax_jvp_##T(long long grid, int threads, const T* p, const T* v, T* out, int n,        \
                                     long long rows, long long inner, long long span, int group) {             \
    run_grid(grid, threads, group, [&](const HostBlock& b, long long blk, long long g) {                        \
      softmax::jvp_block(b, blk, g, p, v, out, n, rows, inner, span);                                         \
    });                                                                                                        \
  }

JG_ENTRIES(float)
JG_ENTRIES(double)
"""

COMMANDS = {
    "g++": ["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-fPIC", "-shared", "-pthread"],
    "nvcc-host": ["nvcc", "-std=c++17", "-O2", "-x", "cu", "-Xcompiler", "-fPIC", "-shared", "-Xcompiler", "-pthread"],
}

P, I32, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
# each kernel's parameters after (grid, threads), "T" for the float type; as in kernels/norm.cu
SIGNATURES = {
    "norm_forward": [P, P, P, P, P, P, I32, I64, "T", I32, I32, I32],
    "norm_product": [P, P, P, P, P, I32, I64, I64, I64, I32, I32, I32],
    "norm_backward": [P, P, P, P, P, P, P, P, I32, I64, I32, I32, I32, I32, I32, I32],
    "norm_param_grads": [P, P, P, P, I32, I64, I64, I32],
    "softmax_rows": [P, P, I32, I64, "T", I64, I64, I32, "mask", I32, I32],
    "softmax_jvp": [P, P, P, I32, I64, I64, I64, I32],
}
SCALAR = {I32: np.int32, I64: np.int64}
CTYPE = {"float": (ctypes.c_float, np.float32), "double": (ctypes.c_double, np.float64)}


def build(compiler: str, folder: Path):
    """The host library built by ``compiler`` ("g++" or "nvcc-host") in ``folder``: a path, or the
    compiler's log as an ``AssertionError``; None when the compiler is not on PATH."""
    cmd = COMMANDS[compiler]
    if shutil.which(cmd[0]) is None:
        return None
    (folder / "norm_host.cpp").write_text(LIBRARY)
    out = folder / f"norm_host_{compiler}.so"
    run = subprocess.run([*cmd, f"-I{kernels.source_dir()}", "norm_host.cpp", "-o", out.name], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    return out if run.returncode == 0 else AssertionError(f"{compiler} failed:\n{run.stdout}{run.stderr}")


class HostModule:
    """A CuPy ``RawModule`` of norm.cu whose kernels run on the host library. ``launches``: the
    name expression, grid and block of every launch, in order."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.launches: list = []

    def get_function(self, expr: str):
        m = re.fullmatch(r"jacgrad::(\w+)<(float|double)>", expr)
        assert m and m.group(1) in SIGNATURES, f"not a norm.cu kernel: {expr}"
        kernel, ctype = m.groups()
        c_t, np_t = CTYPE[ctype]
        masks = [k for k, p in enumerate(SIGNATURES[kernel]) if p == "mask"]  # bool arrays (or a dummy: unread)
        params = [c_t if p == "T" else P if p == "mask" else p for p in SIGNATURES[kernel]]
        fn = getattr(self.lib, f"jg_{kernel}_{ctype}")
        grid_params = [I64, I64, I32] if kernel == "norm_param_grads" else [I64, I32]
        fn.argtypes, fn.restype = grid_params + params, None

        def launch(grid, block, args):
            assert len(args) == len(params), f"{expr}: {len(args)} arguments for {len(params)} parameters"
            self.launches.append((expr, tuple(grid), tuple(block)))
            assert block[0] % 32 == 0 and 32 <= block[0] <= 1024, f"{expr}: block {block}"
            if kernel != "norm_param_grads":  # the threads per row: a power of two, a whole block or a part of a warp
                group = int(args[-1])
                assert group & (group - 1) == 0 and (group == block[0] or group < 32), f"{expr}: group {group}"
            values = []
            for k, (arg, p) in enumerate(zip(args, params)):
                if p is P:
                    dts = (np.dtype(bool), np.dtype(np_t)) if k in masks else (np.dtype(np_t),)
                    assert isinstance(arg, np.ndarray) and arg.dtype in dts and arg.flags.c_contiguous, (
                        f"{expr} argument {k}: needs a C-contiguous {ctype} array, got {type(arg).__name__} "
                        f"{getattr(arg, 'dtype', '')}")
                    values.append(arg.ctypes.data)
                else:
                    want = np_t if p is c_t else SCALAR[p]
                    assert type(arg) is want, f"{expr} argument {k}: needs {want.__name__}, got {type(arg).__name__}"
                    values.append(arg.item())
            fn(*grid, block[0], *values)

        return launch


class FakeNormCupy:
    """What ``jacgrad.core.cuda_build`` asks of CuPy (``RawModule``, ``cuda.Device().id``), with norm.cu's
    kernels on the host library. ``modules``: every module built, ``(code, options, expressions)``."""

    def __init__(self, path):
        self.host = HostModule(path)
        self.modules: list = []
        fake = self

        class RawModule:
            def __init__(self, code=None, options=(), name_expressions=()):
                fake.modules.append((code, tuple(options), tuple(name_expressions)))
                self.name_expressions = tuple(name_expressions)

            def get_function(self, name):
                assert name in self.name_expressions, f"{name} is not among this module's name expressions"
                return fake.host.get_function(name)

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=lambda *a: types.SimpleNamespace(id=0))

    @property
    def launches(self) -> list:
        return self.host.launches


def install(monkeypatch, path) -> tuple[FakeNormCupy, object]:
    """CuPy-typed fake arrays as ``cupy`` (``fake_cupy_transfers.install``: the elementwise kernels and
    GEMMs of the dense layers on their NumPy paths) and norm.cu's kernels on the host library:
    ``(the kernels' fake CuPy, the arrays' fake CuPy)``; ``arrays.asarray(a)`` makes a device array."""
    import fake_cupy_transfers

    from jacgrad.core import cuda_build as _cuda_build
    from jacgrad.cuda import norm_kernels

    from jacgrad.cuda import softmax_kernels

    real = {name: getattr(norm_kernels, name) for name in ("forward", "project", "backward")}
    real_softmax = {name: getattr(softmax_kernels, name) for name in ("softmax_jvp", "softmax_rows")}
    arrays = fake_cupy_transfers.install(monkeypatch)
    for name, fn in real.items():  # the fake routes them to NumPy: here they must launch
        monkeypatch.setattr(norm_kernels, name, fn)
    for name, fn in real_softmax.items():
        monkeypatch.setattr(softmax_kernels, name, fn)
    fake = FakeNormCupy(path)
    monkeypatch.setattr(_cuda_build.backend, "cupy", lambda: fake)
    clear_caches()  # the tests' fixtures clear them again afterwards: the host modules must not outlive them
    return fake, arrays


def clear_caches() -> None:
    from jacgrad.core import cuda_build as _cuda_build

    _cuda_build._module.cache_clear()
    _cuda_build._function.cache_clear()


@pytest.fixture(scope="module")
def host_libraries(tmp_path_factory):
    """{compiler: ``build(compiler, folder)``} for every compiler of ``COMMANDS``."""
    folder = tmp_path_factory.mktemp("norm_host")
    return {c: build(c, folder) for c in COMMANDS}


@pytest.fixture(params=list(COMMANDS))
def host_device(request, host_libraries, monkeypatch):
    """``install``'s (the kernels' fake CuPy, the arrays' fake CuPy) on each compiler's build in turn:
    skipped when the compiler is not on PATH, the compiler's log raised when its build failed."""
    lib = host_libraries[request.param]
    if lib is None:
        pytest.skip(f"{request.param.split('-')[0]} is not on PATH")
    if isinstance(lib, BaseException):
        raise lib
    yield install(monkeypatch, lib)
    clear_caches()
