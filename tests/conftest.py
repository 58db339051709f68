"""Shared fixtures: a seeded RNG, the array backends to run on, and the GPU skip.

Tests marked ``gpu`` run wherever a CUDA device really runs a kernel and are skipped,
with the probe's reason, everywhere else.
"""

import numpy as np
import pytest

import jacgrad as jg


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
