"""The Sturm count behind the report's Lanczos (``jacgrad.algebra.tridiagonal._any_above``) against
dense eigenvalues: random tridiagonals, shifts that land on a zero pivot (the guarded path), and
every block size of its unguarded-then-checked loop."""

import numpy as np
import pytest

from jacgrad.algebra import tridiagonal


def _reference(a, b, x):
    """Whether each row's tridiagonal has an eigenvalue above x, from numpy's dense eigvalsh."""
    top = tridiagonal._top_eigenvalue(a, b) if a.shape[1] else np.full(a.shape[0], -np.inf)
    return top[(slice(None),) + (None,) * (x.ndim - 1)] > x


@pytest.mark.parametrize("block", [1, 3, 32])
def test_any_above_matches_dense_eigenvalues(monkeypatch, block):
    monkeypatch.setattr(tridiagonal, "STURM_BLOCK", block)
    rng = np.random.default_rng(block)
    checked = 0
    for _ in range(300):
        P, k, M = int(rng.integers(1, 5)), int(rng.integers(1, 40)), int(rng.integers(0, 4))
        a, b = rng.standard_normal((P, k)), rng.standard_normal((P, k - 1))
        x = rng.standard_normal((P, M) if M else P) * 2
        ev = np.linalg.eigvalsh(_dense(a, b))
        far = np.abs(ev[:, :, None] - x.reshape(P, 1, -1)).min(axis=1).reshape(x.shape) > 1e-8
        got, want = tridiagonal._any_above(a, b, x), _reference(a, b, x)
        assert np.array_equal(got[far], want[far])
        checked += int(far.sum())
    assert checked > 500


@pytest.mark.parametrize("block", [1, 2, 32])
def test_any_above_zero_pivot_is_guarded(monkeypatch, block):
    """a = (1, 2, 0, 3), x = 1: the first pivot is exactly 0 (it counts as -tiny, not a division
    by zero), and a later one too; the answers are those of the dense eigenvalues."""
    monkeypatch.setattr(tridiagonal, "STURM_BLOCK", block)
    a = np.array([[1.0, 2.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    b = np.array([[1.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    for shift in (1.0, 0.0, -1.0, 2.9, 3.2, 4.0):
        x = np.full(2, shift)
        ev = np.linalg.eigvalsh(_dense(a, b))
        with np.errstate(all="raise"):  # no division by zero escapes
            got = tridiagonal._any_above(a, b, x)
        assert list(got) == [bool((ev[p] > shift + 1e-12).any()) for p in range(2)], shift


def _dense(a, b):
    P, k = a.shape
    T = np.zeros((P, k, k))
    i = np.arange(k)
    T[:, i, i] = a
    T[:, i[:-1], i[1:]] = b
    T[:, i[1:], i[:-1]] = b
    return T
