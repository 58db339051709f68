"""_cuda_graph.GraphCache and _gemm's direct cuBLAS path against a fake CuPy (no GPU needed):
every failing step of a capture becomes CaptureError and leaves no stream capturing, a timeout
or Ctrl-C passes through, cuBLAS gets a workspace from the graph's pool after every
cublasSetStream_v2, and the library is CuPy's own copy."""

import ctypes
import sys
import types

import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_calls import CUDARuntimeError, FakeCupy
from jacgrad.cuda import cublas as _cublas, graphs as _cuda_graph, gemm as _gemm
from jacgrad.cuda.graphs import CaptureError, GraphCache


@pytest.fixture
def fake(monkeypatch):
    def make(**kw):
        cp = FakeCupy(**kw)
        monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
        return cp
    return make


def _step(cp, seen):
    def fn():
        cp.calls.append("step")
        seen.append(_gemm._direct[-1] if _gemm._direct else None)
    return fn


def test_a_capture_records_with_a_workspace_from_the_graphs_pool(fake):
    cp, seen = fake(), []
    graphs = GraphCache()
    graphs.run("k", _step(cp, seen))  # eager, then captured
    graphs.run("k", _step(cp, seen))  # replay
    assert cp.calls == ["step", "stream enter", f"alloc {32 << 20}", "begin_capture", "step", "end_capture",
                        "upload", "stream exit", "launch"]
    assert seen[0] is None  # the eager run: CuPy's own cuBLAS path
    ptr, nbytes = seen[1]  # while recording: direct cuBLAS with the workspace allocated before begin_capture
    assert nbytes == 32 << 20 and ptr != 0
    assert graphs.pool_bytes == 32 << 20 and len(graphs) == 1 and _gemm._direct == []


def test_the_workspace_is_4_mib_before_hopper(fake):
    cp = fake(compute_capability="80")
    graphs = GraphCache()
    graphs.run("k", _step(cp, []))
    assert graphs.pool_bytes == 4 << 20
    assert _gemm.workspace_bytes(9) == 32 << 20 and _gemm.workspace_bytes(10) == 32 << 20


@pytest.mark.parametrize("where", ["begin_capture", "end_capture", "upload"])
def test_every_failing_step_of_a_capture_is_a_capture_error(fake, where):
    cp = fake(fail_at={where})
    graphs = GraphCache()
    with pytest.raises(CaptureError, match=f"CUDARuntimeError: .*{where} failed") as info:
        graphs.run("k", _step(cp, []))
    assert isinstance(info.value.__cause__, CUDARuntimeError)
    assert not graphs._stream.capturing and len(graphs) == 0 and _gemm._direct == []
    assert cp.calls[-1] == "stream exit"


def test_a_failure_while_recording_ends_the_capture(fake):
    cp = fake()
    graphs = GraphCache()
    calls = [0]

    def fn():
        calls[0] += 1
        if calls[0] == 2:  # the recording, not the eager run
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")

    with pytest.raises(CaptureError, match="cuBLAS under stream capture"):
        graphs.run("k", fn)
    assert cp.calls.count("end_capture") == 1 and not graphs._stream.capturing


class _Timeout(BaseException):
    """Like the GPU suite's section timeout: not an Exception."""


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _Timeout])
def test_a_timeout_or_ctrl_c_is_not_swallowed_and_still_ends_the_capture(fake, exc):
    cp = fake()
    graphs = GraphCache()
    calls = [0]

    def fn():
        calls[0] += 1
        if calls[0] == 2:
            raise exc("stop")

    with pytest.raises(exc):
        graphs.run("k", fn)
    assert cp.calls.count("end_capture") == 1 and not graphs._stream.capturing and _gemm._direct == []


def test_training_step_with_auto_falls_back_when_instantiation_fails(fake, rng):
    """The path the issue found broken: end_capture's CUDARuntimeError reached the caller."""
    cp = fake(fail_at={"end_capture"})
    net = jg.MLP.init([4, 6, 3], seed=0)
    x, t = rng.standard_normal((5, 4)), rng.random((5, 3))
    ref_loss, ref = net.loss_and_grads(x, t)
    step = net.compile(5)
    step._graphs = GraphCache()  # the real cache, over the fake CuPy
    loss, g = step(x, t)
    assert loss == ref_loss and all(np.array_equal(a, b) for a, b in zip(g.weights, ref.weights))
    assert not step.captured and "end_capture failed" in step.capture_error
    strict = net.compile(5, capture=False)
    strict._capture, strict._graphs = True, GraphCache()
    with pytest.raises(CaptureError, match="end_capture failed"):
        strict(x, t)


# ----------------------------------------------------------------------------- cuBLAS calls
class _FakeLib:
    """ctypes-like functions recording (name, args); ``status`` per name, 0 by default."""

    def __init__(self, status=None):
        self.calls, self.status, self._name = [], status or {}, "/fake/libcublas.so.13"

    def __getattr__(self, name):
        if not name.startswith("cublas"):
            raise AttributeError(name)
        lib = self

        def f(*args):
            lib.calls.append((name, args))
            return lib.status.get(name, 0)
        f.argtypes = f.restype = None
        setattr(self, name, f)
        return f


def _plan():
    return _gemm.gemm_plan((3, 4), (32, 8), (4, 5), (40, 8), (3, 5), (40, 8), 8)


def test_every_set_stream_is_followed_by_the_workspace(monkeypatch):
    lib = _FakeLib()
    cublas = _gemm._Cublas(cp=FakeCupy(), lib=lib)
    monkeypatch.setattr(jg.backend, "_TF32", [False])
    cublas.gemm(_plan(), 1, 2, 3, np.float64, workspace=(0xABC000, 32 << 20))
    names = [n for n, _ in lib.calls]
    assert names == ["cublasGetPointerMode_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2",
                     "cublasSetPointerMode_v2", "cublasGemmEx", "cublasSetPointerMode_v2"]
    _, (handle, ptr, size) = lib.calls[2]
    assert handle.value == 0xCB1A5 and ptr.value == 0xABC000 and size.value == 32 << 20
    lib.calls.clear()
    cublas.gemm(_plan(), 1, 2, 3, np.float64)  # no workspace given (not capturing): cuBLAS keeps its own
    assert "cublasSetWorkspace_v2" not in [n for n, _ in lib.calls]


def test_a_batched_product_passes_its_strides_and_count(monkeypatch):
    lib = _FakeLib()
    cublas = _gemm._Cublas(cp=FakeCupy(), lib=lib)
    monkeypatch.setattr(jg.backend, "_TF32", [False])
    p, bp = _gemm.gemm_batched_plan((6, 3, 4), (96, 32, 8), (4, 5), (40, 8), (6, 3, 5), (120, 40, 8), 8)
    cublas.gemm(p, 1, 2, 3, np.float64, workspace=(0xABC000, 32 << 20), batch=bp)
    name, args = [c for c in lib.calls if c[0].startswith("cublasGemm")][0]
    assert name == "cublasGemmStridedBatchedEx"
    assert [args[10].value, args[14].value, args[19].value, args[20]] == [0, 12, 15, 6]  # A = b shared, B = a, C
    assert [n for n, _ in lib.calls][-1] == "cublasSetPointerMode_v2"  # the mode restored after the call
    lib.status["cublasGemmStridedBatchedEx"] = 7
    with pytest.raises(RuntimeError, match="cublasGemmStridedBatchedEx returned CUBLAS_STATUS_INVALID_VALUE"):
        cublas.gemm(p, 1, 2, 3, np.float64, batch=bp)


def test_a_refused_workspace_is_an_error_naming_the_call():
    cublas = _gemm._Cublas(cp=FakeCupy(), lib=_FakeLib(status={"cublasSetWorkspace_v2": 7}))
    with pytest.raises(RuntimeError, match="cublasSetWorkspace_v2 returned CUBLAS_STATUS_INVALID_VALUE"):
        cublas.gemm(_plan(), 1, 2, 3, np.float64, workspace=(0xABC000, 4 << 20))


def test_direct_cublas_checks_its_workspace_and_nests():
    with pytest.raises(ValueError, match="workspace must be a device pointer"):
        with _gemm.direct_cublas((0, 10)):
            pass
    with _gemm.direct_cublas((0x1000, 64)):
        with _gemm.direct_cublas():
            assert _gemm._direct == [(0x1000, 64), None]
        assert _gemm._direct == [(0x1000, 64)]
    assert _gemm._direct == []


# ----------------------------------------------------------------------------- which libcublas
def test_open_loaded_never_loads_a_new_copy():
    libc = _gemm.open_loaded("libc.so.6")  # loaded in every CPython process on glibc
    assert hasattr(libc, "malloc")
    with pytest.raises(RuntimeError, match=r"libjacgrad_absent\.so\.1 is not loaded in this process"):
        _gemm.open_loaded("libjacgrad_absent.so.1")


def test_cupy_14_asks_cuda_pathfinder_for_its_cublas(monkeypatch):
    asked = []

    def load_nvidia_dynamic_lib(name):
        asked.append(name)
        return types.SimpleNamespace(abs_path="libc.so.6", was_already_loaded_from_elsewhere=False)

    pathfinder = types.ModuleType("cuda.pathfinder")
    pathfinder.load_nvidia_dynamic_lib = load_nvidia_dynamic_lib
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", pathfinder)
    lib = _gemm.cupy_cublas_library(FakeCupy(version="14.2.0"))
    assert asked == ["cublas"] and isinstance(lib, ctypes.CDLL) and lib._name == "libc.so.6"


def test_older_cupy_opens_the_runtimes_soname_without_loading_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)  # would be ignored below 14 anyway
    opened = []
    monkeypatch.setattr(_cublas, "open_loaded", lambda name: opened.append(name) or name)
    cp = FakeCupy(version="13.6.0")
    cp.cuda.runtime.runtimeGetVersion = lambda: 12080
    assert _gemm.cupy_cublas_library(cp) == "libcublas.so.12"
    cp14 = FakeCupy(version="14.2.0")  # CuPy 14 without cuda.pathfinder importable: the soname too
    assert _gemm.cupy_cublas_library(cp14) == "libcublas.so.13"
    assert opened == ["libcublas.so.12", "libcublas.so.13"]
