"""``backend.dot_along`` (Σ over one axis of a ⊙ b) and ``get_xp``'s fast paths, on NumPy and on a
fake CuPy (its arrays dispatch exactly as CuPy's: ``tests/fake_cupy_transfers.py``)."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.core.backend import dot_along, get_xp

from fake_cupy_transfers import FakeArray, install


@pytest.mark.parametrize("shape,axis", [((5, 7), 1), ((5, 7), 0), ((5, 7), -1), ((3, 4, 6), 1), ((3, 4, 6), 0),
                                        ((3, 4, 6), -1), ((0, 4), 1), ((4,), 0)])
def test_dot_along_matches_an_explicit_sum(shape, axis):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    want = np.sum(a * b, axis=axis)
    got = dot_along(a, b, axis)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_dot_along_on_the_gpu_path_of_a_fake_cupy(monkeypatch):
    fake = install(monkeypatch)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 3, 5))
    for axis in (0, 1, 2):
        got = dot_along(fake.asarray(a), fake.asarray(b), axis)
        assert isinstance(got, FakeArray)  # stayed on the "device"
        np.testing.assert_allclose(np.asarray(got.view(np.ndarray)), np.sum(a * b, axis=axis), rtol=1e-13)


def test_dot_along_rejects_mismatched_shapes_and_mixed_devices(monkeypatch):
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(3, 2\) differ"):
        dot_along(np.ones((2, 3)), np.ones((3, 2)), 0)
    fake = install(monkeypatch)
    with pytest.raises(TypeError, match="different devices"):
        dot_along(fake.asarray(np.ones((2, 3))), np.ones((2, 3)), 1)


def test_get_xp_fast_path_for_device_arrays_keeps_the_mixed_device_error(monkeypatch):
    fake = install(monkeypatch)
    g = fake.asarray(np.ones(3))
    assert get_xp(g, None, g) is fake.module
    assert get_xp(g, 2.0) is fake.module  # a scalar takes the general path: same answer
    with pytest.raises(TypeError, match=r"argument\(s\) \[1\] are NumPy \(CPU\) and \[0\] are CuPy"):
        get_xp(g, np.ones(3))


def test_float_array_fast_path_keeps_its_checks(monkeypatch):
    fv = jg.core.validation.float_array
    x = np.ones(3, np.float32)
    assert fv(x, "x") is x and fv(x, "x", np) is x
    with pytest.raises(TypeError, match="x has dtype int64"):
        fv(np.ones(3, np.int64), "x")
    fake = install(monkeypatch)
    g = fake.asarray(np.ones(3))
    assert fv(g, "g", fake.module) is g and fv(g, "g") is g
    with pytest.raises(TypeError, match="x is a NumPy \\(CPU\\) array but the other inputs are not"):
        fv(x, "x", fake.module)
    with pytest.raises(TypeError, match="g is a CuPy \\(GPU\\) array"):
        fv(g, "g", np)
