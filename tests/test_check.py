"""jacgrad.algebra.check: the checks themselves must be right, and must be able to fail."""

import numpy as np
import pytest

from jacgrad.core import backend
from jacgrad.algebra.check import check_adjoint, check_vjp, compare_backends, numerical_jacobian, relative_error

RNG = np.random.default_rng(0)
A = RNG.standard_normal((4, 3))
X = RNG.standard_normal(3)


def affine_sin(x):
    return A @ x + np.sin(x).sum()


def test_numerical_jacobian_of_a_linear_map_plus_sin_is_the_analytic_one():
    # f(x) = A x + sin(x)  →  J = A + diag(cos x)
    B = RNG.standard_normal((3, 3))
    J = numerical_jacobian(lambda x: B @ x + np.sin(x), X)
    assert np.abs(J - (B + np.diag(np.cos(X)))).max() < 1e-8


def test_numerical_jacobian_shape_is_output_shape_then_input_shape():
    x = RNG.standard_normal((2, 3))
    J = numerical_jacobian(lambda x: np.stack([x.sum(axis=0), (x**2).sum(axis=0)]), x)
    assert J.shape == (2, 3, 2, 3)
    expected = np.zeros((2, 3, 2, 3))
    for i in range(2):
        for j in range(3):
            expected[0, j, i, j] = 1.0
            expected[1, j, i, j] = 2 * x[i, j]
    assert np.abs(J - expected).max() < 1e-8


def test_numerical_jacobian_of_scalar_functions_and_scalar_inputs():
    assert numerical_jacobian(lambda x: (x**2).sum(), np.array([1.0, 2.0])).shape == (2,)
    assert numerical_jacobian(lambda x: x**3, np.array(2.0)) == pytest.approx(12.0, rel=1e-9)


def test_numerical_jacobian_works_in_float64_whatever_the_input_dtype():
    seen = []

    def f(x):
        seen.append(x.dtype)
        return np.exp(x)

    x = np.array([0.5, 50.0], dtype=np.float32)
    J = numerical_jacobian(f, x)
    assert set(seen) == {np.dtype(np.float64)}
    assert J.dtype == np.float64
    # the step is relative to |x|, so the large entry is as accurate as the small one
    assert relative_error(np.diag(J), np.exp(x.astype(np.float64))) < 1e-8


def test_numerical_jacobian_rejects_a_nonpositive_step():
    with pytest.raises(ValueError, match="eps must be positive"):
        numerical_jacobian(np.sin, X, eps=0.0)


def test_check_vjp_passes_a_correct_vjp_and_fails_wrong_ones():
    f = affine_sin

    def vjp(v):
        return A.T @ v + np.cos(X) * v.sum()

    assert check_vjp(f, vjp, X) < 1e-8
    assert check_vjp(f, lambda v: A.T @ v, X) > 1e-2  # forgot the sin term
    assert check_vjp(f, lambda v: 2 * vjp(v), X) > 1e-2  # off by a factor


def test_check_vjp_is_accurate_for_large_inputs_and_float32_vjps():
    x = 1e4 * RNG.standard_normal(3)
    f = lambda x: np.tanh(x / 1e4) * 1e4  # noqa: E731
    vjp = lambda v: (v * (1 - np.tanh(x / 1e4) ** 2)).astype(np.float32)  # noqa: E731
    assert check_vjp(f, vjp, x) < 1e-6


def test_check_vjp_uses_given_directions_and_checks_their_shapes():
    f, vjp = (lambda x: A @ x), (lambda v: A.T @ v)
    assert check_vjp(f, vjp, X, u=np.ones(3), v=np.ones(4)) < 1e-9
    assert check_vjp(f, vjp, X, u=np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match=r"u has shape \(2,\) but x has shape \(3,\)"):
        check_vjp(f, vjp, X, u=np.ones(2))
    with pytest.raises(ValueError, match=r"v has shape \(3,\) but f\(x\) has shape \(4,\)"):
        check_vjp(f, vjp, X, v=np.ones(3))
    with pytest.raises(ValueError, match=r"vjp\(v\) has shape \(4,\) but x has shape \(3,\)"):
        check_vjp(f, lambda v: v, X)


def test_check_adjoint_is_exact_for_a_correct_pair_and_fails_a_transpose_mixup():
    M = RNG.standard_normal((3, 3))
    u, v = RNG.standard_normal(3), RNG.standard_normal(3)
    assert check_adjoint(lambda u: M @ u, lambda v: M.T @ v, u, v) < 1e-14
    assert check_adjoint(lambda u: M @ u, lambda v: M @ v, u, v) > 1e-2
    assert check_adjoint(lambda u: 0 * u, lambda v: 0 * v, u, v) == 0.0
    with pytest.raises(ValueError, match=r"jvp\(u\) has shape \(4,\) but v has shape \(3,\)"):
        check_adjoint(lambda u: A @ u, lambda v: A.T @ v, u, v)


def test_relative_error_is_max_abs_error_over_max_abs_reference():
    assert relative_error(np.array([1.0, -4.2]), np.array([1.0, -4.0])) == pytest.approx(0.05)
    assert relative_error(np.array([0.5]), np.zeros(1)) == 0.5  # absolute when the reference is 0
    assert relative_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    assert np.isnan(relative_error(np.array([np.nan]), np.array([1.0])))
    assert relative_error(np.float32(1.0), 1.0) == 0.0
    with pytest.raises(ValueError, match=r"a has shape \(2,\) but the reference b has shape \(3,\)"):
        relative_error(np.ones(2), np.ones(3))


def test_compare_backends_measures_float32_against_the_float64_reference():
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    labels = np.array([0, 1])

    def fn(x, labels, scale):
        assert labels.dtype.kind == "i"
        return x * scale, np.exp(x)[labels]

    err = compare_backends(fn, x, labels, 2.0, device="cpu")
    assert 0 < err < 1e-6
    assert compare_backends(fn, x.astype(np.float64), labels, 2.0, device="cpu") == 0.0


@pytest.mark.skipif(backend.gpu_available(), reason="checks the error where no GPU runs")
def test_compare_backends_says_when_no_gpu_runs():
    with pytest.raises(RuntimeError, match="asks for the GPU"):
        compare_backends(np.tanh, np.ones(3))


@pytest.mark.gpu
def test_checks_take_cupy_arrays_and_compare_the_gpu_with_numpy():
    import cupy

    x = cupy.asarray(X)
    J = numerical_jacobian(lambda x: A @ np.sin(x), x)  # x is copied to the host as float64
    assert np.abs(J - A * np.cos(X)).max() < 1e-8
    assert relative_error(x, X) == 0.0
    assert compare_backends(lambda x: x * 2, X.astype(np.float32)) < 1e-6
    assert check_adjoint(lambda u: u * 2, lambda v: v * 2, x, x) < 1e-15
