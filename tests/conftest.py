"""Shared fixtures: a seeded RNG, the array backends to run on, and the GPU skip.

Tests marked ``gpu`` run wherever a CUDA device really runs a kernel and are skipped,
with the probe's reason, everywhere else.
"""

import os

import numpy as np
import pytest

import jacgrad as jg

try:  # CI draws the same property-test examples every run: a red CI is a bug, not a dice roll
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is in the test extra; tests that use it import it themselves
    pass


def pytest_collection_modifyitems(config, items):
    reason = jg.backend.gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: NumPy everywhere, CuPy where a GPU runs."""
    if request.param == "numpy":
        return np
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def one_blas_thread():
    """Small GEMMs are latency-bound: on a 2-core machine shared with other busy processes,
    OpenBLAS's spinning threads make them 5-10x slower. One BLAS thread where threadpoolctl is
    installed (it is optional; the results do not depend on it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture
def recording(monkeypatch):
    """``fake_cupy_transfers`` as ``cupy``, jacgrad's cuBLAS calls carried out on the host
    (``_HostCublas``), and CuPy's own matmul refused inside ``direct_cublas()`` as CuPy refuses it
    under stream capture (``NotImplementedError``)."""
    import types

    from fake_cupy_transfers import FakeArray, install
    from jacgrad.cuda import gemm as _gemm
    from test_compiled_jacobian import _HostCublas

    fake = install(monkeypatch)
    host = _HostCublas()
    monkeypatch.setattr(_gemm._Cublas, "get", classmethod(lambda cls: host))
    monkeypatch.setattr(FakeArray, "data", property(lambda a: types.SimpleNamespace(ptr=a.__array_interface__["data"][0])),
                        raising=False)

    def refused(*args, **kwargs):
        if _gemm._direct:
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
        return np.matmul(*(np.asarray(a).view(np.ndarray) if isinstance(a, FakeArray) else a for a in args),
                         **kwargs).view(FakeArray)

    monkeypatch.setattr(FakeArray, "__matmul__", lambda a, b: refused(a, b))
    fake.module.matmul = refused
    fake.host = host
    return fake
