"""A stand-in for the few CuPy pieces jacgrad's GPU plumbing touches, for CPU tests.

It records what was called, in order (``calls``), and fails where a test asks it to
(``fail_at``), with CuPy's own exception type names (``CUDARuntimeError``, ``CompileException``),
so the error paths of ``_cuda_graph``, ``_gemm`` and ``_cuda_build`` run without a GPU.
It has no arrays: for whole computations on fake device arrays that count host transfers, see
``fake_cupy_transfers.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import types


class CUDARuntimeError(RuntimeError):
    """CuPy's cupy_backends.cuda.api.runtime.CUDARuntimeError: an Exception, not a CaptureError."""


class CompileException(Exception):
    """CuPy's cupy.cuda.compiler.CompileException (NVRTC's log in its message)."""


class FakeCupy:
    """``fail_at``: names of steps that raise (``begin_capture``, ``end_capture``, ``upload``,
    ``compile``). ``compute_capability``: the device's, as CuPy spells it (``"90"``)."""

    uint8 = "uint8"

    def __init__(self, fail_at=(), compute_capability="90", version="14.2.0"):
        self.fail_at = set(fail_at)
        self.calls: list = []
        self.modules: list = []  # every RawModule constructed: (code, options, name_expressions)
        self.__version__ = version
        self._ptrs = itertools.count(0x10000, 0x1000)
        self._allocator = None
        fake = self

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = next(fake._ptrs)
                self.capturing = False

            def __enter__(self):
                fake.calls.append("stream enter")
                return self

            def __exit__(self, *exc):
                fake.calls.append("stream exit")
                return False

            def begin_capture(self):
                fake._step("begin_capture")
                self.capturing = True

            def end_capture(self):
                was, self.capturing = self.capturing, False
                if not was:
                    raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
                fake._step("end_capture")
                return Graph()

            def is_capturing(self):
                return self.capturing

        class Graph:
            def upload(self):
                fake._step("upload")

            def launch(self):
                fake.calls.append("launch")

        class MemoryPool:
            def __init__(self):
                self.blocks = []

            def malloc(self, nbytes):
                self.blocks.append(nbytes)
                return types.SimpleNamespace(ptr=next(fake._ptrs), size=nbytes)

            def total_bytes(self):
                return sum(self.blocks)

        @contextlib.contextmanager
        def using_allocator(malloc):
            before, fake._allocator = fake._allocator, malloc
            try:
                yield
            finally:
                fake._allocator = before

        class Device:
            def __init__(self, id=None):
                self.id = 0
                self.compute_capability = compute_capability

            def synchronize(self):
                fake.calls.append("synchronize")

        class RawModule:
            def __init__(self, code=None, options=(), name_expressions=()):
                fake.modules.append((code, tuple(options), tuple(name_expressions)))
                if "compile" in fake.fail_at:
                    raise CompileException("error: identifier \"Nope\" is undefined")
                self.name_expressions = tuple(name_expressions)

            def get_function(self, name):
                if name not in self.name_expressions:
                    raise KeyError(f"{name} was not among the name expressions of this module")
                return ("kernel", name)

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Stream=Stream, MemoryPool=MemoryPool, using_allocator=using_allocator, Device=Device,
            get_current_stream=lambda: types.SimpleNamespace(ptr=0),
            device=types.SimpleNamespace(get_cublas_handle=lambda: 0xCB1A5),
            runtime=types.SimpleNamespace(runtimeGetVersion=lambda: 13000),
        )

    def _step(self, name):
        self.calls.append(name)
        if name in self.fail_at:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureInvalidated: {name} failed (fake)")

    def empty(self, n, dtype=None):
        if self._allocator is None:
            raise AssertionError("allocated outside any pool: the graph's addresses would not stay valid")
        mem = self._allocator(int(n))
        self.calls.append(f"alloc {int(n)}")
        return types.SimpleNamespace(data=types.SimpleNamespace(ptr=mem.ptr), nbytes=int(n), _mem=mem)
