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
    """What a CUDA-graph capture runs, on the host (``fake_capture.install_recording``): fake CuPy
    arrays, jacgrad's cuBLAS calls on a ``HostCublas``, CuPy's own matmul/einsum refused while recording."""
    from fake_capture import install_recording

    return install_recording(monkeypatch)
