"""CUDA graphs of a compiled step: capture once per key, replay on the caller's stream.

How a step is captured (CuPy ≥ 13, CUDA 12/13):

- Warm-up first, eagerly, on the caller's current stream: NVRTC compiles jacgrad's RawModule
  kernels and CuPy's elementwise/reduction kernels, cuBLAS creates its handle. Module loading and
  compilation are not stream work and must not happen while capturing.
- Capture on a private non-blocking stream (the legacy default stream cannot be captured) with
  CuPy's default relaxed mode, under a private ``cupy.cuda.MemoryPool``. The step itself writes
  only into preallocated buffers; if a library call allocates anyway (CuPy's CUB-backed
  reductions may take scratch space), the block comes from that pool, which nothing else uses
  and which lives as long as the graph: the addresses baked into the graph stay valid, and
  ``pool_bytes`` reports how much that was.
- cuBLAS: CuPy's wrapper of cublasSetStream raises ``NotImplementedError("calling cuBLAS API
  during stream capture is currently unsupported")`` on a capturing stream
  (cupy_backends/cuda/libs/cublas.pyx, still so in CuPy 14.2; cupy/cupy#6290), so no CuPy matmul
  can be recorded. The capture therefore runs inside ``_gemm.direct_cublas()``: jacgrad's
  products call ``cublasSetStream_v2`` + ``cublasGemmEx`` themselves (ctypes, CuPy's handle and
  library), and gives cuBLAS a workspace taken from the graph's pool before capturing (32 MiB on
  sm_90), since ``cublasSetStream_v2`` resets it. Alpha/beta are host scalars, read at capture.
  If any step of the capture fails (recording, ``end_capture``'s instantiation, ``upload``), it raises
  ``CaptureError`` after the eager run has produced this call's results, and ``TrainingStep``
  with ``capture="auto"`` runs without a graph from then on (``capture=True`` raises). First run
  on an H100 on 2026-11-26: every compiled step recorded its graph and its replays matched float64
  NumPy (benchmarks/results/h100-2026-11-26).
- Replay: ``graph.launch()`` on the current stream, so the copies of x and the target into the
  static buffers (issued just before, on the same stream) and any later work of the caller are
  ordered with it. Nothing here waits for the device.

This module reaches CuPy only through ``jacgrad.core.backend.cupy()``.
"""

from __future__ import annotations

from typing import Callable, Hashable

from ..core import backend
from .gemm import direct_cublas, workspace_bytes

__all__ = ["CaptureError", "GraphCache", "raised_in"]


class CaptureError(RuntimeError):
    """Recording the step into a CUDA graph failed; the eager warm-up before it had succeeded."""


def raised_in(exc: BaseException) -> str:
    """`` in <module>.<function>``: the innermost jacgrad function outside ``jacgrad.cuda`` that the
    exception passed through (the piece that could not be recorded, e.g. a CuPy matmul in a
    layer's batched product), or "" when none did."""
    tb, where = exc.__traceback__, ""
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__", "")
        if module.startswith("jacgrad.") and not module.startswith("jacgrad.cuda."):
            where = f" in {module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
        tb = tb.tb_next
    return where


class GraphCache:
    """One CUDA graph per key (for a step: target kind × TF32 setting) of a function that
    enqueues work on the current stream and allocates nothing of its own."""

    def __init__(self):
        self._cp = backend.cupy()
        self._stream = self._cp.cuda.Stream(non_blocking=True)
        self._graphs: dict = {}
        self._pools: dict = {}

    def run(self, key: Hashable, fn: Callable[[], None]) -> None:
        """Replay the graph of ``key``; the first time, run ``fn`` eagerly (this call's results)
        and capture it for the next calls. ``CaptureError`` when the capture fails: the eager run
        has completed by then, so its results are valid."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.launch()
            return
        fn()
        self._graphs[key] = self._capture(key, fn)

    def _capture(self, key: Hashable, fn: Callable[[], None]):
        """Record ``fn`` on the private stream. Every step that can fail — the workspace, begin,
        the recording, end (instantiation) and upload — raises ``CaptureError``; the stream never
        stays in capture mode, whatever was raised (a ``KeyboardInterrupt`` or a caller's timeout,
        which are not ``Exception``s, pass through unchanged after the capture is ended)."""
        cp, stream = self._cp, self._stream
        pool = cp.cuda.MemoryPool()
        capturing = False
        with cp.cuda.using_allocator(pool.malloc), stream:
            try:
                # cuBLAS's workspace, from the graph's pool and before capturing (see cuda/gemm.py)
                major = int(cp.cuda.Device().compute_capability) // 10
                workspace = cp.empty(workspace_bytes(major), dtype=cp.uint8)
                stream.begin_capture()
                capturing = True
                with direct_cublas((workspace.data.ptr, workspace.nbytes)):  # CuPy's cuBLAS refuses capture
                    fn()
                capturing = False  # end_capture leaves capture mode even when it fails
                graph = stream.end_capture()
                upload = getattr(graph, "upload", None)
                if upload is not None:
                    upload()  # instantiate on the device now, so the first replay is not slower
            except Exception as exc:
                hint = " (cuBLAS under stream capture: see jacgrad/cuda/gemm.py)" if "cublas" in str(exc).lower() else ""
                raise CaptureError(
                    f"capturing the step into a CUDA graph failed ({type(exc).__name__}: {exc}){hint}{raised_in(exc)}; "
                    "compiled with capture='auto' or False, the same step runs without a graph"
                ) from exc
            finally:
                if capturing:
                    try:
                        stream.end_capture()
                    except Exception:  # noqa: BLE001 - the capture was invalidated by the failure itself
                        pass
        self._pools[key] = (pool, workspace)  # both live as long as the graph
        return graph

    def clear(self) -> None:
        """Drop every graph (after a rebind, the baked-in weight addresses are stale). Waits for the
        device first (the one synchronisation here), so no replay in flight loses its pool."""
        if self._graphs:
            self._cp.cuda.Device().synchronize()
        self._graphs.clear()
        self._pools.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def pool_bytes(self) -> int:
        return int(sum(pool.total_bytes() for pool, _ in self._pools.values()))
